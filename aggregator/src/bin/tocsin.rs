//! `tocsin`: the on-call CLI (see `tocsin_aggregator::cli`).

fn main() -> std::process::ExitCode {
    match tocsin_agent::settings::parse_args() {
        Ok(cli) => tocsin_aggregator::cli::main(cli),
        Err(code) => code,
    }
}
