#!/usr/bin/env bash
# Backup benchmark (issue 5's target): on a pgbench database (scale 100 by default, ~1.5 GB),
# in the same run and on the same server, times a full backup and a restore, and measures the
# stored size, for
#   - pgkeel backup create --jobs 2 / pgkeel restore --latest,
#   - pgBackRest (Debian's pgbackrest, compress-type=zst, process-max=2) backup / restore,
#   - pg_basebackup -Ft -Z zstd / tar -I zstd -x.
# Restores are timed to the files being in place (not the WAL replay that follows, which is
# the same postgres work for all three).
#
#   scripts/bench-backup.sh [--scale N]
#
# Runs as root (postgres and pgBackRest run as the OS user postgres); uses /var/tmp/pgkeel-bench-backup.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=100
while [ $# -gt 0 ]; do
    case "$1" in
        --scale) scale="$2"; shift 2 ;;
        *) echo "usage: $0 [--scale N]" >&2; exit 64 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (postgres and pgBackRest run as the postgres OS user)" >&2; exit 1; }

./scripts/install-deps.sh
command -v pgbackrest >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest; }
command -v zstd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd
cargo build --release -p pgkeel
PGKEEL=$PWD/target/release/pgkeel
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

W=/var/tmp/pgkeel-bench-backup
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    "$PGKEEL" down --dir "$W/cluster" >/dev/null 2>&1 || true
    for d in "$W"/restore-*; do [ -f "$d/postmaster.pid" ] && as_pg "$BIN/pg_ctl" stop -D "$d" -m immediate >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$W"
mkdir -p "$W" && chmod 755 "$W"

echo "== cluster and data (pgbench scale $scale)"
"$PGKEEL" up --dir "$W/cluster" --nodes 1 --detach >/dev/null
DSN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["dsn"])' "$W/cluster/up.json")
CONFIG=$W/cluster/nodes/n1/node.toml
DATA=$W/cluster/nodes/n1/data
SOCK=$W/cluster/nodes/n1/run
PORT=$(python3 -c 'import sys,urllib.parse as u; print(u.urlparse(sys.argv[1]).port)' "$DSN")
"$BIN/pgbench" -q -i -s "$scale" "$DSN" 2>&1 | tail -1
psql "$DSN" -Atc "select 'database size: ' || pg_size_pretty(pg_database_size(current_database()))"

# pgBackRest gets its own repository and archives next to pgkeel's archive_command.
mkdir -p "$W/pgbackrest-repo" "$W/pgbackrest-log" && chown postgres: "$W/pgbackrest-repo" "$W/pgbackrest-log"
cat > "$W/pgbackrest.conf" <<EOF
[global]
repo1-path=$W/pgbackrest-repo
compress-type=zst
process-max=2
log-path=$W/pgbackrest-log
start-fast=y
[bench]
pg1-path=$DATA
pg1-socket-path=$SOCK
pg1-port=$PORT
EOF
chmod 644 "$W/pgbackrest.conf"
PGBR="pgbackrest --config=$W/pgbackrest.conf --stanza=bench"
pgkeel_archive=$(psql "$DSN" -Atc "show archive_command")
psql "$DSN" -qc "alter system set archive_command = '$pgkeel_archive && $PGBR archive-push %p'" -c "select pg_reload_conf()" >/dev/null
as_pg $PGBR stanza-create >/dev/null

secs() { python3 -c 'import time; print(time.monotonic())'; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
bytes() { du -sb "$1" | cut -f1; }
mb() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6:.0f} MB')" "$1"; }

echo "== full backups"
t0=$(secs); "$PGKEEL" backup create --config "$CONFIG" --jobs 2 >/dev/null 2>>"$W/pgkeel.log"; t1=$(secs)
pgkeel_backup=$(elapsed "$t0" "$t1")
label=$("$PGKEEL" backup list --config "$CONFIG" --json | python3 -c 'import json,sys; print([b["label"] for b in json.load(sys.stdin) if b["status"] == "complete"][-1])')
pgkeel_size=$(bytes "$W/cluster/backups/pgkeel/backups/$label")

t0=$(secs); as_pg $PGBR backup --type=full --repo1-retention-full=9999 >/dev/null; t1=$(secs)
pgbr_backup=$(elapsed "$t0" "$t1")
pgbr_size=$(bytes "$W/pgbackrest-repo/backup/bench")

mkdir -p "$W/basebackup" && chown postgres: "$W/basebackup"
REPL_PW=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["postgres"]["replication"]["password"])' "$CONFIG")
t0=$(secs)
as_pg "$BIN/pg_basebackup" -d "host=127.0.0.1 port=$PORT user=pgkeel_replicator password=$REPL_PW" -D "$W/basebackup/b" -Ft -Z zstd -X fetch -c fast
t1=$(secs)
pgbb_backup=$(elapsed "$t0" "$t1")
pgbb_size=$(bytes "$W/basebackup/b")

echo "== restores (files in place)"
t0=$(secs); "$PGKEEL" restore --config "$CONFIG" --to "$W/restore-pgkeel" --latest --jobs 2 >/dev/null 2>>"$W/pgkeel.log"; t1=$(secs)
pgkeel_restore=$(elapsed "$t0" "$t1")

mkdir -p "$W/restore-pgbackrest" && chown postgres: "$W/restore-pgbackrest" && chmod 700 "$W/restore-pgbackrest"
t0=$(secs); as_pg $PGBR restore --pg1-path="$W/restore-pgbackrest" >/dev/null; t1=$(secs)
pgbr_restore=$(elapsed "$t0" "$t1")

mkdir -p "$W/restore-basebackup" && chown postgres: "$W/restore-basebackup" && chmod 700 "$W/restore-basebackup"
t0=$(secs)
as_pg tar -I zstd -xf "$W/basebackup/b/base.tar.zst" -C "$W/restore-basebackup"
t1=$(secs)
pgbb_restore=$(elapsed "$t0" "$t1")

echo
echo "backup benchmark (pgbench scale $scale, $(nproc) cores):"
printf '  %-34s backup %6ss  restore %6ss  stored %s\n' "pgkeel (zstd, --jobs 2)" "$pgkeel_backup" "$pgkeel_restore" "$(mb "$pgkeel_size")"
printf '  %-34s backup %6ss  restore %6ss  stored %s\n' "pgBackRest 2 (zst, process-max=2)" "$pgbr_backup" "$pgbr_restore" "$(mb "$pgbr_size")"
printf '  %-34s backup %6ss  restore %6ss  stored %s\n' "pg_basebackup -Ft -Z zstd" "$pgbb_backup" "$pgbb_restore" "$(mb "$pgbb_size")"
python3 -c "import sys; print(f'  pgkeel stored size / pgBackRest: {int(sys.argv[1]) / int(sys.argv[2]):.3f}')" "$pgkeel_size" "$pgbr_size"
