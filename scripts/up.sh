#!/usr/bin/env bash
# From a fresh machine to a running local cluster: install what is missing, build pgkeel
# (release), then run `pgkeel up` in the foreground. Ctrl-C stops the cluster; running this
# again resumes it.
#
#   scripts/up.sh                 3 nodes in /var/tmp/pgkeel-demo
#   scripts/up.sh --nodes 5       extra arguments go to `pgkeel up` (--nodes only counts
#                                 when the cluster is created; --detach returns once it is up)
#   PGKEEL_DIR=/var/tmp/other scripts/up.sh
#
# When run as root, postgres runs as the OS user `postgres`, which must be able to enter the
# directory and every directory above it: /var/tmp is fine, /root is not.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
fi

./scripts/install-deps.sh

echo "up.sh: building pgkeel (cargo build --release -p pgkeel)"
cargo build --release -p pgkeel

target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/pgkeel" up --dir "${PGKEEL_DIR:-/var/tmp/pgkeel-demo}" "$@"
