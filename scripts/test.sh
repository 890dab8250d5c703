#!/usr/bin/env bash
# Everything CI checks, in the order CI checks it: test tools, formatting, lints, tests.
# Exits non-zero at the first failing step.
#
#   scripts/test.sh
#
# The integration tests start real PostgreSQL servers (as the OS user `postgres` when run as
# root) in temporary directories on free ports; nothing uses port 5432.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
fi

started=$SECONDS
current="setup"
step() {
    current="$*"
    echo
    echo "==> $* ($((SECONDS - started))s)"
}
trap 'echo; echo "==> FAILED: $current ($((SECONDS - started))s)" >&2' ERR

# Panics in the integration tests explain themselves; backtraces only bury the node logs.
export RUST_BACKTRACE=0

step "install dependencies (scripts/install-deps.sh --test)"
./scripts/install-deps.sh --test

step "format (cargo fmt --all -- --check)"
cargo fmt --all -- --check

step "lint (cargo clippy --workspace --all-targets -- -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    step "test (cargo nextest run --workspace --profile ci)"
    cargo nextest run --workspace --profile ci
    # The proxy runs one thread unless PGKEEL_PROXY_THREADS says otherwise; its end-to-end
    # tests again on a multi-threaded runtime, where sessions, pools and server connections
    # move between threads (the proxies the tests start inherit the variable).
    step "test the proxy on two threads (PGKEEL_PROXY_THREADS=2, binaries proxy and proxy_switchover)"
    PGKEEL_PROXY_THREADS=2 cargo nextest run -p pgkeel --profile ci -E 'binary(proxy) or binary(proxy_switchover)'
else
    step "test (cargo test --workspace; cargo-nextest is not installed)"
    cargo test --workspace
fi

echo
echo "==> all steps passed in $((SECONDS - started))s"
