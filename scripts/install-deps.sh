#!/usr/bin/env bash
# Install what pgkeel needs to build, run `pgkeel up` and run its tests on Debian 12.
#
#   scripts/install-deps.sh          build and run: PostgreSQL server, etcd, C toolchain, tools
#   scripts/install-deps.sh --test   the same, plus test-only tools (cargo-nextest; promtool, from
#                                    Debian's prometheus package, to check the alert rules; and moto,
#                                    a local S3-compatible server, and psycopg, in /opt/pgkeel-test-venv)
#
# Idempotent: it checks first and calls apt-get only when a package is missing. Runs as root
# without prompts; as another user it uses sudo when sudo exists.
set -euo pipefail

want_test_tools=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test_tools=1 ;;
        -h | --help)
            sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install-deps: unknown argument: $arg (use --test or nothing)" >&2
            exit 2
            ;;
    esac
done

say() { echo "install-deps: $*"; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "need root to run: $*"
        say "run this script as root, or install sudo"
        exit 1
    fi
}

# rustup installs cargo in ~/.cargo/bin; a non-login shell may not have it on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
fi

# --- Debian packages -------------------------------------------------------------------------

# Installed means dpkg says "install ok installed" (a removed package leaves "deinstall").
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for pkg in build-essential pkg-config ca-certificates curl bc python3 libclang-dev; do
    installed "$pkg" || missing+=("$pkg")
done
# The PostgreSQL server: any /usr/lib/postgresql/<major>/bin/postgres will do (pgkeel picks
# the newest). The client-only package does not provide it.
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    missing+=(postgresql)
fi
# etcd (3.4 or newer): the DCS for clusters that span machines, and the etcd tests start real
# etcd processes (on free ports, in temp dirs). Any etcd on PATH will do. Where systemd runs,
# Debian's package also starts an etcd service on 127.0.0.1:2379; nothing in pgkeel's tests
# uses it (`systemctl disable --now etcd` stops it).
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
    missing+=(etcd-server)
fi
# systemd-analyze checks the shipped unit files (deploy/systemd/) in a test.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    missing+=(systemd)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages: all present"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing: ${missing[*]}"
        say "this script knows only apt-get (Debian/Ubuntu); install the equivalents by hand"
        exit 1
    fi
    say "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    say "no /usr/lib/postgresql/*/bin/postgres after installing postgresql; something is wrong with apt"
    exit 1
fi
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
    say "no etcd after installing etcd-server; something is wrong with apt"
    exit 1
fi

# PostgreSQL refuses to run as root: when pgkeel runs as root it starts postgres as the OS
# user "postgres". The postgresql package creates that user; create it if it is missing anyway.
if ! id -u postgres >/dev/null 2>&1; then
    say "creating the OS user postgres"
    as_root useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# --- Rust ------------------------------------------------------------------------------------

if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'MSG'
install-deps: cargo (Rust) is not installed.
Install Rust with rustup (https://rustup.rs), then open a new shell or run `. "$HOME/.cargo/env"`:

    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy

pgkeel needs Rust 1.89 or newer. Then run this script again.
MSG
    exit 1
fi
say "rust: $(cargo --version)"

# --- Test-only tools -------------------------------------------------------------------------

if [ "$want_test_tools" -eq 1 ]; then
    for component in fmt clippy; do
        if ! cargo "$component" --version >/dev/null 2>&1; then
            say "cargo $component is missing; install it with: rustup component add ${component/fmt/rustfmt}"
            exit 1
        fi
    done
    if cargo nextest --version >/dev/null 2>&1; then
        say "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
    else
        say "cargo-nextest is missing: building it from crates.io (cargo install cargo-nextest --locked);"
        say "this compiles it from source and takes a few minutes the first time"
        if ! cargo install cargo-nextest --locked; then
            say "could not install cargo-nextest; scripts/test.sh falls back to cargo test"
        fi
    fi

    # promtool checks and unit-tests the shipped alert rules (deploy/prometheus). Debian ships
    # it in the prometheus package; where systemd runs, that package also starts a Prometheus
    # service on :9090, which nothing in pgkeel's tests uses (`systemctl disable --now prometheus`).
    if command -v promtool >/dev/null 2>&1; then
        say "promtool: $(promtool --version 2>&1 | head -n1)"
    else
        say "promtool is missing: installing Debian's prometheus package"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
        if ! command -v promtool >/dev/null 2>&1; then
            say "no promtool after installing prometheus; something is wrong with apt"
            exit 1
        fi
    fi

    # A venv of its own for the Python test tools: Debian's python refuses `pip install` into
    # the system site-packages.
    venv=/opt/pgkeel-test-venv
    make_venv() {
        [ -x "$venv/bin/python" ] && [ -x "$venv/bin/pip" ] && return 0
        local py=/usr/bin/python3
        [ -x "$py" ] || py=$(command -v python3)
        if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            say "installing python3-venv (for $venv)"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
        fi
        say "creating the test tools' venv $venv"
        as_root rm -rf "$venv"
        as_root "$py" -m venv "$venv"
    }

    # moto (PyPI, moto[server]): the S3-compatible server the S3 repository tests start on a
    # free port. The tests use /opt/pgkeel-test-venv/bin/moto_server, else moto_server on PATH,
    # and fail (naming this script) when neither exists.
    if [ -x "$venv/bin/moto_server" ] && "$venv/bin/moto_server" --help >/dev/null 2>&1; then
        say "moto: $venv/bin/moto_server"
    elif command -v moto_server >/dev/null 2>&1 && moto_server --help >/dev/null 2>&1; then
        say "moto: $(command -v moto_server) (on PATH)"
    else
        make_venv
        say "moto is missing: installing moto[server] from PyPI into $venv"
        as_root "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
        if ! "$venv/bin/moto_server" --help >/dev/null 2>&1; then
            say "moto_server does not run after installing moto[server] into $venv"
            exit 1
        fi
        say "moto: $venv/bin/moto_server"
    fi
    # psycopg 3 (PyPI, psycopg[binary]): the Python client the proxy's TLS test drives
    # (crates/pgkeel/tests/proxy_tls.rs), in the same venv, whether or not moto is there (a
    # moto_server on PATH needs no venv; psycopg always does).
    make_venv
    psycopg_version() { "$venv/bin/python" -c 'import psycopg; print(psycopg.__version__)' 2>/dev/null; }
    if ! psycopg_version >/dev/null; then
        say "psycopg is missing: installing psycopg[binary] from PyPI into $venv"
        as_root "$venv/bin/pip" install --quiet --disable-pip-version-check 'psycopg[binary]'
        if ! psycopg_version >/dev/null; then
            say "psycopg does not import after installing psycopg[binary] into $venv"
            exit 1
        fi
    fi
    say "psycopg: $(psycopg_version)"
fi

say "done"
