#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, checks format and
# lints, builds every binary with the committed Cargo.lock, then runs all tests.
# Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
if ! command -v cc >/dev/null; then
    log "installing a C compiler (bundled SQLite)"
    apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev
fi

log "format"
cargo fmt --all -- --check
log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "build"
cargo build --workspace --bins --locked
log "doc tests"
cargo test --workspace --doc --locked
# Last, so its summary line closes the output.
log "tests"
cargo nextest run --workspace --locked --profile ci
