//! `tocsin`: the on-call CLI (see `tocsin_aggregator::cli`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    tocsin_aggregator::cli::main(tocsin_aggregator::cli::Cli::parse())
}
