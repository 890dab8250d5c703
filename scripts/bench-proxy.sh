#!/usr/bin/env bash
# Proxy benchmark (issue 4's targets): in the same run and against the same postgres, compares
#   - postgres directly,
#   - PgBouncer (Debian's, transaction mode, SCRAM-SHA-256 from a userlist),
#   - `pgkeel proxy` (transaction mode, SCRAM-SHA-256 from the same userlist),
# both poolers with the same pool size (20) and max_client_conn (3000):
#   1. 2,000 idle clients (logged in, one `select 1` each, then idle) per pooler: the pooler's
#      RSS (/proc/PID/status VmRSS) before and with them (scripts/bench-proxy-idle.py);
#   2. `pgbench -S` (select-only) for each protocol mode and client count, `-j 2`, printing
#      tps (without connection time), average and p99 latency (from the per-transaction
#      `-l` logs), failed transactions, the pooler's CPU time per transaction (and how much
#      of it in user space, the rest being the kernel's sending and receiving) and the share
#      of its runnable time it spent waiting for a CPU (/proc/PID/task/*/schedstat, and
#      /proc/PID/stat's utime for the split, sampled at the clock tick), these three over the
#      run's steady part (from pgbench's first progress report, after the logins, to a second
#      before the end) and the transactions that ended in it.
# The three targets run one after the other for each (mode, clients), in several rounds
# whose order alternates, so load changes on the machine hit them alike; a single run on a
# busy 2-core machine varies by +-15 %. The table gives each target's mean tps over the
# rounds and its p99 over all of their transactions, then each round's pgkeel/PgBouncer
# ratio and a 95 % confidence interval of the typical ratio (from 2 rounds on; more rounds
# narrow it). Postgres is a 1-member `pgkeel up` cluster (the proxy follows the cluster's DCS),
# max_connections = 600, pgbench scale 10.
# With PGKEEL_BENCH_CONCURRENT=1, each round runs the two poolers at the same time instead
# (each with the full client count; direct is skipped): both then see exactly the same
# machine, so the per-round ratio carries far less of the machine's noise than runs one
# after the other do (absolute tps are about half, as the poolers share the CPUs).
# With PGKEEL_BENCH_INSTRUCTIONS=1, it first counts each pooler's user-space instructions per
# transaction (valgrind's callgrind, a second instance of each pooler on its own port, the
# first client count, every mode): a figure that does not depend on the machine's load, to
# tell a change in the proxy's own cost from noise. The kernel's share (sending and
# receiving, about 80 % of either pooler's CPU time here) is not in it.
# With PGKEEL_BENCH_CACHE=1 (and PGKEEL_BENCH_INSTRUCTIONS=1), callgrind also simulates small
# caches (32 KiB instruction and last-level, 8 KiB data) and prints each pooler's misses per
# transaction: roughly the code and data lines a transaction touches that do not stay cached
# across the other clients' turns, the cost that instruction counts miss on a machine whose
# caches postgres and the clients keep taking (docs/benchmarks.md). The logins (SCRAM) take
# much longer with cache simulation, so the window starts later and lasts longer (about
# 2.5 min per pooler and mode).
#
#   scripts/bench-proxy.sh
#
# Settings (environment):
#   PGKEEL_BENCH_SECONDS=10               seconds per pgbench run (at least 3)
#   PGKEEL_BENCH_ROUNDS=3                 runs per target and (mode, clients), interleaved
#   PGKEEL_BENCH_CLIENTS="32 256"         pgbench client counts
#   PGKEEL_BENCH_MODES="simple extended prepared"
#                                         pgbench -M modes (prepared: PgBouncer >= 1.21 only)
#   PGKEEL_BENCH_IDLE=2000                idle clients per pooler (0: skip)
#   PGKEEL_BENCH_POOL_SIZE=20             server connections per pool, both poolers
#   PGKEEL_BENCH_SCALE=10                 pgbench -i scale
#   PGKEEL_BENCH_JOBS=2                   pgbench -j
#   PGKEEL_BENCH_TARGETS="direct pgbouncer pgkeel"
#                                         which of the three pgbench runs
#   PGKEEL_BENCH_CONCURRENT=0             1: PgBouncer and pgkeel runs at the same time
#   PGKEEL_BENCH_INSTRUCTIONS=0           1: also instructions per transaction (callgrind)
#   PGKEEL_BENCH_CACHE=0                  1: with INSTRUCTIONS=1, also simulated cache misses
#   PGKEEL_BENCH_SAME=                    pgbouncer or pgkeel: a second instance of that pooler
#                                         takes the other's slot in the pgbench runs (the
#                                         table's labels stay), to check that the harness
#                                         favours neither slot; needs PGKEEL_BENCH_IDLE=0
#   PGKEEL_BENCH_BARE=0                   1: pgkeel's slot runs examples/bare_pooler.rs instead of
#                                         the proxy: a bare transaction pooler on one event
#                                         loop, what a minimal forwarding core costs against
#                                         PgBouncer (docs/benchmarks.md); tokio: the same
#                                         pooler as a tokio task per client (also under
#                                         callgrind with PGKEEL_BENCH_INSTRUCTIONS=1); needs
#                                         PGKEEL_BENCH_IDLE=0 and no SAME
#   PGKEEL_BIN=path                       use this pgkeel binary instead of building the release one
#   PGKEEL_BENCH_KEEP=1                   keep the work directory (logs, configs) afterwards
#
# Runs as root (postgres and PgBouncer run as the postgres OS user).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${PGKEEL_BENCH_SECONDS:-10}
case $SECS in *[!0-9]* | "" | [0-2]) echo "bench-proxy: PGKEEL_BENCH_SECONDS must be a whole number of seconds, at least 3, not '$SECS'" >&2; exit 1 ;; esac
ROUNDS=${PGKEEL_BENCH_ROUNDS:-3}
CLIENTS=${PGKEEL_BENCH_CLIENTS:-"32 256"}
MODES=${PGKEEL_BENCH_MODES:-"simple extended prepared"}
IDLE=${PGKEEL_BENCH_IDLE:-2000}
POOL=${PGKEEL_BENCH_POOL_SIZE:-20}
SCALE=${PGKEEL_BENCH_SCALE:-10}
JOBS=${PGKEEL_BENCH_JOBS:-2}
TARGETS=${PGKEEL_BENCH_TARGETS:-"direct pgbouncer pgkeel"}
CONCURRENT=${PGKEEL_BENCH_CONCURRENT:-0}
case $CONCURRENT in 0 | 1) ;; *) echo "bench-proxy: PGKEEL_BENCH_CONCURRENT must be 0 or 1, not '$CONCURRENT'" >&2; exit 1 ;; esac
INSTRUCTIONS=${PGKEEL_BENCH_INSTRUCTIONS:-0}
case $INSTRUCTIONS in 0 | 1) ;; *) echo "bench-proxy: PGKEEL_BENCH_INSTRUCTIONS must be 0 or 1, not '$INSTRUCTIONS'" >&2; exit 1 ;; esac
CACHE=${PGKEEL_BENCH_CACHE:-0}
case $CACHE in 0 | 1) ;; *) echo "bench-proxy: PGKEEL_BENCH_CACHE must be 0 or 1, not '$CACHE'" >&2; exit 1 ;; esac
if [ "$CACHE" = 1 ] && [ "$INSTRUCTIONS" != 1 ]; then
    echo "bench-proxy: PGKEEL_BENCH_CACHE=1 simulates caches under callgrind: set PGKEEL_BENCH_INSTRUCTIONS=1 too" >&2
    exit 1
fi
SAME=${PGKEEL_BENCH_SAME:-}
case $SAME in "" | pgbouncer | pgkeel) ;; *) echo "bench-proxy: PGKEEL_BENCH_SAME must be pgbouncer or pgkeel, not '$SAME'" >&2; exit 1 ;; esac
if [ -n "$SAME" ] && { [ "$IDLE" != 0 ] || [ "$INSTRUCTIONS" != 0 ]; }; then
    echo "bench-proxy: PGKEEL_BENCH_SAME compares pgbench runs only: set PGKEEL_BENCH_IDLE=0 and PGKEEL_BENCH_INSTRUCTIONS=0" >&2
    exit 1
fi
BARE=${PGKEEL_BENCH_BARE:-0}
case $BARE in 0 | 1 | tokio) ;; *) echo "bench-proxy: PGKEEL_BENCH_BARE must be 0, 1 or tokio, not '$BARE'" >&2; exit 1 ;; esac
if [ "$BARE" != 0 ] && { [ "$IDLE" != 0 ] || [ -n "$SAME" ]; }; then
    echo "bench-proxy: PGKEEL_BENCH_BARE compares pgbench runs only: set PGKEEL_BENCH_IDLE=0, and no PGKEEL_BENCH_SAME" >&2
    exit 1
fi
MAX_CLIENT_CONN=3000
[ "$(id -u)" = 0 ] || { echo "bench-proxy: run as root (postgres and PgBouncer run as the postgres OS user)" >&2; exit 1; }

./scripts/install-deps.sh >/dev/null
command -v pgbouncer >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
}
if [ "$INSTRUCTIONS" = 1 ] && ! command -v valgrind >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if [ -n "${PGKEEL_BIN:-}" ]; then
    PGKEEL=$(realpath "$PGKEEL_BIN")
else
    cargo build --release -p pgkeel --bin pgkeel
    PGKEEL=$PWD/target/release/pgkeel
fi
if [ "$BARE" != 0 ]; then
    cargo build --release -p pgkeel-proxy --example bare_pooler
fi
# 2,000 clients need 2,000 descriptors in the client and in each pooler (which inherit this).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE + MAX_CLIENT_CONN / 2)) ]; then
    echo "bench-proxy: the open-files limit ($(ulimit -n)) is too low for $IDLE idle clients; raise it (ulimit -Hn, /etc/security/limits.conf) or set PGKEEL_BENCH_IDLE lower" >&2
    exit 1
fi

W=$(mktemp -d /var/tmp/pgkeel-bench-proxy.XXXXXX)
chmod 755 "$W"
PROXY_PID=
SECOND_PID= # PGKEEL_BENCH_SAME=pgkeel's second proxy, or PGKEEL_BENCH_BARE's pooler
CALLGRIND_PID=
cleanup() {
    set +e
    [ -n "$CALLGRIND_PID" ] && kill "$CALLGRIND_PID" 2>/dev/null
    if [ -n "$PROXY_PID" ]; then
        kill "$PROXY_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$PROXY_PID" 2>/dev/null
    fi
    [ -n "$SECOND_PID" ] && kill "$SECOND_PID" 2>/dev/null
    for f in "$W/pgbouncer/pgbouncer.pid" "$W/pgbouncer2/pgbouncer.pid"; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    [ -d "$W/cluster" ] && "$PGKEEL" down --dir "$W/cluster" >/dev/null 2>&1
    if [ "${PGKEEL_BENCH_KEEP:-0}" = 1 ]; then
        echo "bench-proxy: kept $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT WHAT [SECONDS]: waits (up to 20 s) until something accepts connections on
# 127.0.0.1:PORT.
wait_port() {
    python3 - "$1" "$2" "${3:-20}" <<'EOF'
import socket, sys, time
port, what, secs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + secs
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"bench-proxy: {what} does not accept connections on port {port} after {secs} s: {e}")
        time.sleep(0.1)
EOF
}
# cpu_sched PID: the pooler's CPU time and its time runnable but waiting for a CPU, in ns,
# summed over its threads (/proc/PID/task/*/schedstat), then its user-space CPU time in clock
# ticks (/proc/PID/stat utime, all threads); "- - -" when the kernel keeps no schedstat.
cpu_sched() {
    local user
    user=$(awk '{print $14}' /proc/"$1"/stat 2>/dev/null) || user=-
    cat /proc/"$1"/task/*/schedstat 2>/dev/null |
        awk -v user="$user" '{r += $1; w += $2; n++} END {if (n && user != "") printf "%.0f %.0f %s\n", r, w, user; else print "- - -"}'
}
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); exec("print(d" + sys.argv[2] + ")")' "$W/cluster/up.json" "$1"; }

echo "== postgres: 1-member pgkeel cluster, pgbench scale $SCALE (work directory $W)"
"$PGKEEL" up --dir "$W/cluster" --nodes 1 --detach >"$W/up.log" 2>&1 || { cat "$W/up.log" >&2; exit 1; }
PW=$(json '["superuser"]["password"]')
DSN=$(json '["nodes"][0]["dsn"]')
PGPORT=$(python3 -c 'import sys,urllib.parse as u; print(u.urlparse(sys.argv[1]).port)' "$DSN")
"$PGKEEL" config set --dir "$W/cluster" postgresql.parameters.max_connections=600 >/dev/null
deadline=$((SECONDS + 60))
until [ "$(psql "$DSN" -Atc 'show max_connections' 2>/dev/null)" = 600 ]; do
    [ $SECONDS -lt $deadline ] || { echo "bench-proxy: max_connections did not become 600 within 60 s" >&2; exit 1; }
    "$PGKEEL" restart --dir "$W/cluster" n1 >/dev/null 2>&1 || true
    sleep 1
done
"$BIN/pgbench" -q -i -s "$SCALE" "$DSN" 2>&1 | tail -1

B=$W/pgbouncer # PgBouncer's files, the postgres OS user's
mkdir -p "$B"
printf '"postgres" "%s"\n' "$PW" >"$W/userlist.txt"
chmod 600 "$W/userlist.txt"
cp "$W/userlist.txt" "$B/userlist.txt"

BOUNCER_VERSION=$(pgbouncer --version | awk 'NR == 1 {print $2}')
bouncer_prepared=0
[ "$(printf '%s\n1.21.0\n' "$BOUNCER_VERSION" | sort -V | head -1)" = 1.21.0 ] && bouncer_prepared=1
BPORT=$(free_port)
cat >"$B/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $B/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $MAX_CLIENT_CONN
logfile = $B/pgbouncer.log
pidfile = $B/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
if [ $bouncer_prepared = 1 ]; then echo "max_prepared_statements = 200" >>"$B/pgbouncer.ini"; fi
chown -R postgres: "$B"
# Started as root and switching to postgres itself (-u): runuser/su would apply PAM's
# open-files limit (1024), too low for the idle clients.
pgbouncer -u postgres -d "$B/pgbouncer.ini"
wait_port "$BPORT" PgBouncer || { tail -5 "$B/pgbouncer.log" >&2; exit 1; }
BOUNCER_PID=$(cat "$B/pgbouncer.pid")
bouncer_files=$(awk '/^Max open files/ {print $4}' "/proc/$BOUNCER_PID/limits")
if [ "$bouncer_files" != unlimited ] && [ "$bouncer_files" -lt $((IDLE + 100)) ]; then
    echo "bench-proxy: PgBouncer may open only $bouncer_files files, too few for $IDLE idle clients" >&2
    exit 1
fi

KPORT=$(free_port)
cat >"$W/proxy.toml" <<EOF
cluster = "pgkeel"
listen = "127.0.0.1:$KPORT"
pool_mode = "transaction"
pool_size = $POOL
max_client_conn = $MAX_CLIENT_CONN
[tls]
# Plain TCP to postgres, as PgBouncer's default (server_tls_sslmode = disable).
server_tls = "disable"
[dcs]
kind = "local"
path = "$W/cluster/dcs"
[auth]
userlist = "userlist.txt"
EOF
# In a session of its own (setsid), as PgBouncer (-d) and postgres are: with the kernel's
# autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) each session is one
# scheduling group, and a proxy left in this script's session would share one group's CPU
# share with pgbench's threads while PgBouncer has a group to itself. setsid execs without
# forking here (a background job of a script is no process group leader), so $! is the proxy.
setsid "$PGKEEL" --log-level warn proxy --config "$W/proxy.toml" >"$W/proxy.log" 2>&1 &
PROXY_PID=$!
wait_port "$KPORT" "pgkeel proxy"
# The pooler each pgbench run measures: PgBouncer's slot and pgkeel's.
BOUNCER_SLOT_PID=$BOUNCER_PID KEEL_SLOT_PID=$PROXY_PID
case $SAME in
pgbouncer)
    B2=$W/pgbouncer2
    mkdir -p "$B2"
    cp "$B/userlist.txt" "$B2/userlist.txt"
    KPORT=$(free_port)
    sed -e "s/^listen_port = .*/listen_port = $KPORT/" -e "s|^logfile = .*|logfile = $B2/pgbouncer.log|" \
        -e "s|^pidfile = .*|pidfile = $B2/pgbouncer.pid|" -e "s|^auth_file = .*|auth_file = $B2/userlist.txt|" \
        "$B/pgbouncer.ini" >"$B2/pgbouncer.ini"
    chown -R postgres: "$B2"
    pgbouncer -u postgres -d "$B2/pgbouncer.ini"
    wait_port "$KPORT" "the second PgBouncer" || { tail -5 "$B2/pgbouncer.log" >&2; exit 1; }
    KEEL_SLOT_PID=$(cat "$B2/pgbouncer.pid")
    ;;
pgkeel)
    BPORT=$(free_port)
    sed "s/^listen = .*/listen = \"127.0.0.1:$BPORT\"/" "$W/proxy.toml" >"$W/proxy-second.toml"
    setsid "$PGKEEL" --log-level warn proxy --config "$W/proxy-second.toml" >"$W/proxy-second.log" 2>&1 &
    SECOND_PID=$!
    wait_port "$BPORT" "the second pgkeel proxy"
    BOUNCER_SLOT_PID=$SECOND_PID
    ;;
esac
# bare_pooler PORT [COMMAND...]: the bare pooler (PGKEEL_BENCH_BARE) on PORT, run by COMMAND.
# Only as a background job (`&`): it execs, so $! is COMMAND's (or the pooler's) pid.
bare_pooler() {
    local port=$1 core=()
    shift
    if [ "$BARE" = tokio ]; then core=(--tokio); fi
    exec "$@" target/release/examples/bare_pooler "${core[@]}" "$port" "127.0.0.1:$PGPORT" postgres "$PW" postgres "$POOL"
}
if [ "$BARE" != 0 ]; then
    KPORT=$(free_port)
    bare_pooler "$KPORT" setsid >"$W/bare.log" 2>&1 &
    SECOND_PID=$!
    wait_port "$KPORT" "the bare pooler" || { tail -5 "$W/bare.log" >&2; exit 1; }
    KEEL_SLOT_PID=$SECOND_PID
    echo "== PGKEEL_BENCH_BARE=$BARE: pgkeel's slot runs the bare pooler (examples/bare_pooler.rs, port $KPORT)"
fi
[ -n "$SAME" ] && echo "== PGKEEL_BENCH_SAME=$SAME: both slots run $SAME (PgBouncer's slot on port $BPORT, pgkeel's on $KPORT)"
for port in "$BPORT" "$KPORT"; do
    PGPASSWORD=$PW psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atc 'select 1' >/dev/null
done

machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), PgBouncer $BOUNCER_VERSION, $("$BIN/postgres" --version)"
echo "== $machine"
echo "== load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

declare -A RSS_BEFORE RSS_WITH
if [ "$IDLE" -gt 0 ]; then
    echo "== $IDLE idle clients per pooler"
    for target in pgbouncer pgkeel; do
        if [ $target = pgbouncer ]; then port=$BPORT pid=$BOUNCER_PID; else port=$KPORT pid=$PROXY_PID; fi
        read -r n before with took < <(python3 scripts/bench-proxy-idle.py --port "$port" --user postgres \
            --password "$PW" --clients "$IDLE" --pid "$pid")
        RSS_BEFORE[$target]=$before RSS_WITH[$target]=$with
        awk -v t=$target -v n="$n" -v s="$took" -v b="$before" -v w="$with" \
            'BEGIN {printf "  %-10s %d clients logged in in %s s; RSS %6.1f MB before, %6.1f MB with them\n", t, n, s, b / 1024, w / 1024}'
    done
fi

# instructions TARGET MODE CLIENTS: runs a second instance of the pooler under callgrind on a
# port of its own, `pgbench -S` through it, and counts the pooler's instructions over 20 s
# once the clients are logged in (callgrind_control zeroes the counters, then dumps them),
# divided by the transactions that completed in that window (from pgbench's -l log).
instructions() {
    local target=$1 mode=$2 clients=$3 port dir ctl vg bench t0 t1
    # Logging in under callgrind takes a while (SCRAM), far longer with cache simulation.
    local vgopts=(--tool=callgrind --compress-strings=no) warmup=12 window=20 length=40
    if [ "$CACHE" = 1 ]; then
        vgopts+=(--cache-sim=yes --I1=32768,8,64 --D1=8192,2,64 --LL=32768,8,64)
        warmup=70 window=50 length=150
    fi
    dir=$W/instructions/$target-$mode-$clients
    mkdir -p "$dir"
    chmod 777 "$dir"
    port=$(free_port)
    if [ "$target" = pgbouncer ]; then
        sed -e "s/^listen_port = .*/listen_port = $port/" -e "s|^logfile = .*|logfile = $dir/pgbouncer.log|" \
            -e "s|^pidfile = .*|pidfile = $dir/pgbouncer.pid|" "$B/pgbouncer.ini" >"$dir/pgbouncer.ini"
        chown postgres: "$dir/pgbouncer.ini"
        runuser -u postgres -- valgrind "${vgopts[@]}" \
            --callgrind-out-file="$dir/callgrind.out" pgbouncer "$dir/pgbouncer.ini" >"$dir/valgrind.log" 2>&1 &
        ctl="runuser -u postgres -- callgrind_control"
    elif [ "$BARE" != 0 ]; then
        bare_pooler "$port" valgrind "${vgopts[@]}" --callgrind-out-file="$dir/callgrind.out" >"$dir/valgrind.log" 2>&1 &
        ctl=callgrind_control
    else
        # In $W, as the userlist path is relative to the configuration file. Under callgrind
        # a server login (SCRAM) among 32 busy clients can take longer than the default 5 s.
        sed "s/^listen = .*/listen = \"127.0.0.1:$port\"\nserver_connect_timeout = \"120s\"\nfailover_hold_timeout = \"120s\"/" "$W/proxy.toml" >"$W/proxy-$mode.toml"
        valgrind "${vgopts[@]}" --callgrind-out-file="$dir/callgrind.out" \
            "$PGKEEL" --log-level warn proxy --config "$W/proxy-$mode.toml" >"$dir/valgrind.log" 2>&1 &
        ctl=callgrind_control
    fi
    CALLGRIND_PID=$!
    wait_port "$port" "$target under callgrind" 120 || { tail -5 "$dir/valgrind.log" >&2; exit 1; }
    # The valgrind process itself (runuser's child for PgBouncer).
    vg=$(pgrep -f -- "--callgrind-out-file=$dir/callgrind.out" | while read -r p; do
        [ "$(readlink "/proc/$p/exe")" != "$(command -v runuser)" ] && echo "$p"; done | head -1)
    PGPASSWORD=$PW "$BIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -S -M "$mode" -c "$clients" -j "$JOBS" \
        -T $length -l --log-prefix="$dir/tx" postgres >"$dir/out" 2>&1 &
    bench=$!
    # The window starts once the clients are logged in.
    sleep $warmup
    t0=$(date +%s%6N)
    $ctl -z "$vg" >/dev/null 2>&1
    sleep $window
    $ctl -d "$vg" >/dev/null 2>&1
    t1=$(date +%s%6N)
    wait $bench || { echo "bench-proxy: pgbench failed against $target under callgrind:" >&2; tail -5 "$dir/out" >&2; exit 1; }
    kill "$CALLGRIND_PID" "$vg" 2>/dev/null
    wait "$CALLGRIND_PID" 2>/dev/null || true
    CALLGRIND_PID=
    local label=$target
    if [ "$target" = pgkeel ] && [ "$BARE" != 0 ]; then label="bare($BARE)"; fi
    python3 - "$dir" "$t0" "$t1" "$label" "$mode" "$clients" <<'EOF'
import glob, sys
d, t0, t1, target, mode, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
n = 0
for f in glob.glob(f"{d}/tx.*"):
    for line in open(f):
        c = line.split()
        n += t0 <= int(c[4]) * 1_000_000 + int(c[5]) < t1
try:
    lines = open(f"{d}/callgrind.out.1").read().splitlines()
    events = next(line.split()[1:] for line in lines if line.startswith("events:"))
    counts = dict(zip(events, map(int, next(line.split()[1:] for line in lines if line.startswith("summary:")))))
except (OSError, StopIteration) as e:
    sys.exit(f"bench-proxy: callgrind wrote no counts for {target} ({d}/callgrind.out.1: {e}); see {d}/valgrind.log")
if n == 0:
    sys.exit(f"bench-proxy: no transaction completed through {target} under callgrind in the window")
print(f"  {mode:9s} {clients:>4s} clients  {target:9s}  {counts['Ir'] / n:7.0f} instructions per transaction ({n} transactions)")
if "ILmr" in counts:
    # Simulated caches (PGKEEL_BENCH_CACHE=1): misses per transaction.
    per = {k: v / n for k, v in counts.items()}
    print(f"  {mode:9s} {clients:>4s} clients  {target:9s}  {per['ILmr']:7.1f} code and {per['DLmr'] + per['DLmw']:.1f} data "
          f"last-level misses per transaction (first level: {per['I1mr']:.1f} code, {per['D1mr'] + per['D1mw']:.1f} data)")
EOF
}

if [ "$INSTRUCTIONS" = 1 ]; then
    first_clients=${CLIENTS%% *}
    echo "== user-space instructions per transaction, pgbench -S, $first_clients clients, under callgrind$([ "$CACHE" = 1 ] && echo " (simulated caches: 32 KiB code and last level, 8 KiB data)")"
    for mode in $MODES; do
        for target in pgbouncer pgkeel; do
            if [ "$target" = pgbouncer ] && [ "$mode" = prepared ] && [ $bouncer_prepared = 0 ]; then
                continue
            fi
            instructions "$target" "$mode" "$first_clients"
        done
    done
fi

# run_pgbench TARGET PORT MODE CLIENTS ROUND: one pgbench -S run; appends a result line to
# $W/results. Two may run at once (PGKEEL_BENCH_CONCURRENT): each writes its line once.
run_pgbench() {
    local target=$1 port=$2 mode=$3 clients=$4 round=$5 pid=
    local dir=$W/runs/$target-$mode-$clients/$round
    mkdir -p "$dir"
    case $target in pgbouncer) pid=$BOUNCER_SLOT_PID ;; pgkeel) pid=$KEEL_SLOT_PID ;; esac
    local s0="- - -" s1="- - -" t0=0 t1=0 bench end left
    case " $TARGETS " in *" $target "*) ;; *) return 0 ;; esac
    # -T counts from before the logins: the run ends SECS after its start.
    end=$(($(date +%s%3N) + SECS * 1000))
    PGPASSWORD=$PW "$BIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -S -M "$mode" -c "$clients" -j "$JOBS" \
        -T "$SECS" -P 1 -l --log-prefix="$dir/tx" postgres >"$dir/out" 2>&1 &
    bench=$!
    # The pooler's CPU is measured over the run's steady part, against the transactions that
    # ended in it: from pgbench's first progress report, which comes once every client has
    # logged in (a SCRAM login costs a pooler far more than a transaction), to a second before
    # the run's end. None when the logins leave less than a second, or pgbench ended (failed).
    if [ -n "$pid" ]; then
        # -s: the background shell may not have made the file yet.
        while kill -0 "$bench" 2>/dev/null && ! grep -qs '^progress:' "$dir/out"; do sleep 0.1; done
        t0=$(date +%s.%N) && s0=$(cpu_sched "$pid")
        left=$((end - 1000 - $(date +%s%3N)))
        if [ "$left" -ge 1000 ] && kill -0 "$bench" 2>/dev/null; then
            sleep "$((left / 1000)).$(printf %03d $((left % 1000)))"
            t1=$(date +%s.%N) && s1=$(cpu_sched "$pid")
        else
            s0="- - -"
        fi
    fi
    if ! wait "$bench"; then
        echo "bench-proxy: pgbench failed against $target ($mode, $clients clients):" >&2
        tail -5 "$dir/out" >&2
        exit 1
    fi
    python3 - "$dir" "$target" "$mode" "$clients" "$s0" "$s1" "$round" "$t0" "$t1" >"$dir/result" <<'EOF'
import glob, os, re, sys
d, target, mode, clients, s0, s1, rnd, t0, t1 = sys.argv[1:]
t0, t1 = float(t0), float(t1)
out = open(f"{d}/out").read()
tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
done = re.search(r"number of transactions actually processed: (\d+)", out)
if not tps or not done or int(done.group(1)) == 0:
    # pgbench -T counts the logins: with many clients on a busy machine (side by side, the
    # other pooler taking the CPUs) they can take the whole run.
    sys.exit(f"bench-proxy: no transaction completed through {target} ({mode}, {clients} clients) in the run; "
             f"the logins may have taken all of it: raise PGKEEL_BENCH_SECONDS (pgbench's output: {d}/out, kept with PGKEEL_BENCH_KEEP=1)")
tps = float(tps.group(1))
failed = re.search(r"number of failed transactions: (\d+)", out)
failed = int(failed.group(1)) if failed else 0
lat = []
# Transactions that ended within the CPU window (columns 5 and 6: the end, epoch s and us).
steady = 0
for f in glob.glob(f"{d}/tx.*"):
    with open(f) as fh:
        for line in fh:
            cols = line.split()
            lat.append(int(cols[2]))
            steady += t0 <= int(cols[4]) + int(cols[5]) / 1e6 < t1
lat.sort()
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000
avg = sum(lat) / len(lat) / 1000
# The pooler's CPU time per transaction, and the share of its runnable time it spent waiting
# for a CPU (a pooler that is runnable nearly all the time on busy cores gets its fair share
# of CPU time, and its tps is that share divided by its CPU per transaction:
# docs/benchmarks.md, "Proxy"). The user-space part comes from clock-tick samples (utime).
if "-" in (s0 + s1):
    cpu_us = wait = user_us = "-"
else:
    (r0, w0, u0), (r1, w1, u1) = map(int, s0.split()), map(int, s1.split())
    cpu_us = f"{(r1 - r0) / 1000 / max(steady, 1):.1f}"
    wait = f"{100 * (w1 - w0) / max(r1 - r0 + w1 - w0, 1):.0f}"
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    user_us = f"{(u1 - u0) * tick_us / max(steady, 1):.1f}"
print(f"{mode} {clients} {target} {tps:.0f} {avg:.3f} {p99:.3f} {failed} {cpu_us} {wait} {rnd} {user_us}")
EOF
    cat "$dir/result" >>"$W/results"
    awk '{printf "  %-9s %4s clients  %-9s  tps %7s  avg %7s ms  p99 %7s ms  failed %s  pooler CPU %s us per transaction (%s in user space), waiting for a CPU %s %%  (round %s)\n", $1, $2, $3, $4, $5, $6, $7, $8, $11, $9, $10}' "$dir/result"
}

layout="one target after the other"
[ "$CONCURRENT" = 1 ] && layout="PgBouncer and pgkeel at the same time"
echo "== pgbench -S, ${SECS} s per run, $ROUNDS rounds, -j $JOBS, pool size $POOL, $layout"
: >"$W/results"
for mode in $MODES; do
    for clients in $CLIENTS; do
        if [ "$mode" = prepared ] && [ $bouncer_prepared = 0 ]; then
            echo "  $mode $clients clients  pgbouncer: skipped (PgBouncer $BOUNCER_VERSION has no prepared statements in transaction mode; 1.21+ has)"
        fi
        for round in $(seq "$ROUNDS"); do
            if [ "$CONCURRENT" = 1 ]; then
                if [ "$mode" = prepared ] && [ $bouncer_prepared = 0 ]; then
                    continue
                fi
                run_pgbench pgbouncer "$BPORT" "$mode" "$clients" "$round" &
                bouncer_run=$!
                run_pgbench pgkeel "$KPORT" "$mode" "$clients" "$round" &
                keel_run=$!
                wait $bouncer_run || exit 1
                wait $keel_run || exit 1
                continue
            fi
            # Odd rounds direct, PgBouncer, pgkeel; even rounds the other way round.
            order="direct pgbouncer pgkeel"
            [ $((round % 2)) = 0 ] && order="pgkeel pgbouncer direct"
            for target in $order; do
                case $target in
                    direct) run_pgbench direct "$PGPORT" "$mode" "$clients" "$round" ;;
                    pgbouncer)
                        if [ "$mode" != prepared ] || [ $bouncer_prepared = 1 ]; then
                            run_pgbench pgbouncer "$BPORT" "$mode" "$clients" "$round"
                        fi
                        ;;
                    pgkeel) run_pgbench pgkeel "$KPORT" "$mode" "$clients" "$round" ;;
                esac
            done
        done
    done
done
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "proxy benchmark, $(date -u +%Y-%m-%d), $machine, $layout"
python3 - "$W" <<'EOF'
import glob, math, sys
w = sys.argv[1]
rows = [l.split() for l in open(f"{w}/results") if l.strip()]
# (mode, clients, target) -> {round: tps}; the pooler's CPU us per transaction and % of its
# runnable time waiting for a CPU, per round.
tps, cpu, wait, user = {}, {}, {}, {}
for mode, clients, target, t, _avg, _p99, _failed, c, wt, rnd, u in rows:
    tps.setdefault((mode, clients, target), {})[rnd] = float(t)
    if c != "-":
        cpu.setdefault((mode, clients, target), []).append(float(c))
        wait.setdefault((mode, clients, target), []).append(float(wt))
        user.setdefault((mode, clients, target), []).append(float(u))


def p99(mode, clients, target):
    lat = []
    for f in glob.glob(f"{w}/runs/{target}-{mode}-{clients}/*/tx.*"):
        with open(f) as fh:
            lat.extend(int(line.split()[2]) for line in fh)
    if not lat:
        return "-"
    lat.sort()
    return f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000:.1f}"


def mean(key):
    t = tps.get(key)
    return sum(t.values()) / len(t) if t else None


def show(v):
    return f"{v:.0f}" if v else "-"


# Two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: about 2.0).
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
       2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def interval(ratios):
    """The 95 % confidence interval of the typical per-round ratio (geometric mean, t on the
    logs): the rounds are paired, so load drifts on the machine cancel out of each ratio."""
    if len(ratios) < 2:
        return "-"
    logs = [math.log(r) for r in ratios]
    m = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))
    h = T95[min(len(logs) - 2, len(T95) - 1)] * sd / math.sqrt(len(logs))
    return f"{math.exp(m - h):.2f}-{math.exp(m + h):.2f}"


print("| mode | clients | direct tps | PgBouncer tps | pgkeel tps | direct p99 ms | PgBouncer p99 ms | pgkeel p99 ms "
      "| pgkeel/PgBouncer tps | per round | 95 % CI | CPU us/txn PgBouncer / pgkeel | of which user space "
      "| waiting for a CPU % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
seen = []
for r in rows:
    if (r[0], r[1]) not in seen:
        seen.append((r[0], r[1]))
for mode, clients in seen:
    d, b, k = (mean((mode, clients, t)) for t in ("direct", "pgbouncer", "pgkeel"))
    ratio = f"{k / b:.2f}" if b and k else "-"
    bt, kt = tps.get((mode, clients, "pgbouncer"), {}), tps.get((mode, clients, "pgkeel"), {})
    paired = [kt[r] / bt[r] for r in sorted(kt, key=int) if r in bt and bt[r] and kt[r]]
    rounds = " ".join(f"{x:.2f}" for x in paired) or "-"
    def avg(table, target, fmt):
        v = table.get((mode, clients, target))
        return format(sum(v) / len(v), fmt) if v else "-"

    c = [avg(cpu, t, ".1f") for t in ("pgbouncer", "pgkeel")]
    waits = [avg(wait, t, ".0f") for t in ("pgbouncer", "pgkeel")]
    users = [avg(user, t, ".1f") for t in ("pgbouncer", "pgkeel")]
    print(f"| {mode} | {clients} | {show(d)} | {show(b)} | {show(k)} | {p99(mode, clients, 'direct')} "
          f"| {p99(mode, clients, 'pgbouncer')} | {p99(mode, clients, 'pgkeel')} | {ratio} | {rounds} | {interval(paired)} "
          f"| {c[0]} / {c[1]} | {users[0]} / {users[1]} | {waits[0]} / {waits[1]} |")
EOF
if [ "$IDLE" -gt 0 ]; then
    python3 - "$IDLE" "${RSS_BEFORE[pgbouncer]}" "${RSS_WITH[pgbouncer]}" "${RSS_BEFORE[pgkeel]}" "${RSS_WITH[pgkeel]}" <<'EOF'
import sys
n, bb, bw, kb, kw = map(int, sys.argv[1:])
print(f"\n{n} idle clients: PgBouncer RSS {bb / 1024:.1f} -> {bw / 1024:.1f} MB, pgkeel proxy RSS {kb / 1024:.1f} -> {kw / 1024:.1f} MB; "
      f"pgkeel / PgBouncer = {kw / bw:.2f} (target <= 2); per client {(bw - bb) / n:.1f} kB vs {(kw - kb) / n:.1f} kB")
EOF
fi
