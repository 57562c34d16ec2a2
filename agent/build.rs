//! Link options for the `tocsin-agent` binary (not the library, which the aggregator
//! links too).
//!
//! `-z pack-relative-relocs` (RELR) stores the binary's ~20 000 relative relocations as a
//! bitmap of a few KiB instead of a 0.5 MiB `.rela.dyn` table that the dynamic loader
//! reads at every start, so that table stays resident for the agent's life (issue 3, RSS
//! budget). It needs GNU ld ≥ 2.38 or lld ≥ 15 (older GNU ld warns and ignores it) and,
//! when the linker applied it, glibc ≥ 2.36 where the binary runs (Debian 12, Ubuntu
//! 22.10 and later): build on the oldest glibc you deploy to, as for any glibc binary.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
