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
# Debian packages the tests need, installed only when their command is missing.
apt_missing=()
command -v cc >/dev/null || apt_missing+=(gcc libc6-dev)           # bundled SQLite
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)    # unit verification
command -v adduser >/dev/null || apt_missing+=(adduser)            # .deb maintainer scripts
command -v setpriv >/dev/null || apt_missing+=(util-linux)         # run as the service user
command -v python3 >/dev/null || apt_missing+=(python3 python3-venv)
command -v promtool >/dev/null || apt_missing+=(prometheus)        # promtool check metrics
command -v prometheus-alertmanager >/dev/null || apt_missing+=(prometheus-alertmanager) # real Alertmanager
command -v mount >/dev/null || apt_missing+=(mount)                # tmpfs for disk-full tests
[ -x /usr/lib/nagios/plugins/check_load ] || apt_missing+=(monitoring-plugins-basic) # exec checks
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || apt_missing+=(python3-aiosmtpd) # SMTP server
command -v chromium >/dev/null || apt_missing+=(chromium)          # web view browser test
if ((${#apt_missing[@]})); then
    log "installing ${apt_missing[*]}"
    apt-get update && apt-get install -y --no-install-recommends "${apt_missing[@]}"
fi
# cargo-deb builds the .deb packages. Pinned: the packaging test packs the dev-profile
# binaries (--profile dev), which newer releases may refuse.
if ! cargo deb --version 2>/dev/null | grep -qx 'cargo-deb 3.8.0'; then
    log "installing cargo-deb"
    cargo install cargo-deb --version 3.8.0 --locked
fi
# kubernetes-validate (and PyYAML, which it brings) validates the Kubernetes manifests
# offline. Installed into a virtualenv under target/ unless already on PATH.
if ! { command -v kubernetes-validate >/dev/null && python3 -c 'import yaml' 2>/dev/null; }; then
    venv=target/tools/venv
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        log "installing kubernetes-validate into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
    fi
    PATH="$PWD/$venv/bin:$PATH"
    export PATH
fi

log "format"
cargo fmt --all -- --check
log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "build"
cargo build --workspace --bins --locked
log "doc tests"
cargo test --workspace --doc --locked
log "docs (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# Last, so its summary line closes the output.
log "tests"
cargo nextest run --workspace --locked --profile ci
