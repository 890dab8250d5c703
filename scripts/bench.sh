#!/usr/bin/env bash
# Prints the cluster-core benchmark figures: `pgkeel up` to three streaming members,
# failover time (SIGKILL of the primary's agent + postgres to the first write through a
# libpq multi-host DSN), and idle agent CPU/RSS. Usage: scripts/bench.sh [up|failover|idle|all] [--runs N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release -p pgkeel -p pgkeel-testkit
exec target/release/pgkeel-bench "${@:-all}"
