#!/usr/bin/env bash
# System-under-test adapter for Listgate, driven by ../shared/peers/mailman/bench.py
# (same sub-commands and contract as sut-mailman.sh there).
#
#   sut-listgate.sh start                  fresh store, `listgate init`, `listgate serve` in the
#                                          background; return once the intake port answers
#   sut-listgate.sh stop                   SIGTERM to serve; wait for it to exit
#   sut-listgate.sh prepare LIST M MODE    make LIST have exactly the members m00000@example.net
#                                          ... m{M-1}@example.net, all in MODE: regular, or
#                                          mime | plain (digest-mime, digest-plain members);
#                                          the poster m00000 is a moderator: never held
#   sut-listgate.sh wait-idle [TIMEOUT_S]  return once no queue row is pending (default 600 s)
#   sut-listgate.sh digest-send LIST       close the list's open digest batch and send it now
#                                          (`listgate digest send`)
#   sut-listgate.sh pids                   PID of `listgate serve`
#   sut-listgate.sh check                  queue depth, parked rows, errors in the log
#
# Environment (all optional; bench.py sets the first five):
#   PEERS_DIR=/tmp/peers   state in $PEERS_DIR/listgate (listgate.toml, listgate.db, serve.log)
#   POST_HOST=127.0.0.1  POST_PORT=18026   where intake listens
#   SINK_HOST=127.0.0.1  SINK_PORT=18025   the smarthost (the bench's counting sink)
#   BENCH_POST_PROTO=smtp|lmtp             intake protocol; must match bench.py --post-proto
#   LISTGATE_BIN=<repo>/.venv/bin/listgate
#   LISTGATE_BENCH_STORE_URL=              e.g. postgresql+psycopg://user@127.0.0.1/listgate_bench
#                                          (a database for the bench only: `start` deletes its
#                                          queue rows); default: SQLite in the state folder,
#                                          deleted on every start
#   LISTGATE_BENCH_LOG_LEVEL=INFO          [log] level of serve
#   LISTGATE_BENCH_PERSONALIZE=on|off      `lists set --personalize` at prepare (default: the
#                                          list's default, on: one copy per member with their
#                                          own links; off: 100 recipients per transaction)
#   LISTGATE_BENCH_CONFIG_EXTRA=           more TOML appended to listgate.toml (e.g. a
#                                          "[delivery]"-free section such as "[fanout]\nchunk = 500")
#   Any LISTGATE_<SECTION>_<KEY> in the environment overrides the written config, as usual.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PEERS_DIR="${PEERS_DIR:-/tmp/peers}"
STATE="$PEERS_DIR/listgate"
CFG="$STATE/listgate.toml"
PIDFILE="$STATE/serve.pid"
LOGFILE="$STATE/serve.log"
POST_HOST="${POST_HOST:-127.0.0.1}"
POST_PORT="${POST_PORT:-18026}"
SINK_HOST="${SINK_HOST:-127.0.0.1}"
SINK_PORT="${SINK_PORT:-18025}"
PROTO="${BENCH_POST_PROTO:-smtp}"
LISTGATE_BIN="${LISTGATE_BIN:-$HERE/../.venv/bin/listgate}"
PYTHON="$(dirname "$LISTGATE_BIN")/python"
[ -x "$PYTHON" ] || PYTHON=python3
SQLITE_DB="$STATE/listgate.db"
STORE_URL="${LISTGATE_BENCH_STORE_URL:-sqlite:///$SQLITE_DB}"
SHOWN_URL="$(sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#' <<< "$STORE_URL")"  # no password in logs
POSTER=m00000@example.net

lg() { "$LISTGATE_BIN" --config "$CFG" "$@"; }
log() { echo "sut-listgate: $*" >&2; }

port_open() {  # host port -> 0 if something accepts connections there
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0 || return 1
}

serve_pid() {
    local p
    [ -f "$PIDFILE" ] || return 1
    p="$(cat "$PIDFILE" 2>/dev/null)" || return 1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"
}

write_config() {
    mkdir -p "$STATE"
    {
        echo "# Written by bench/sut-listgate.sh on every start."
        echo "[store]"
        echo "url = \"$STORE_URL\""
        echo
        echo "[intake]"
        echo "listen = [\"$PROTO://$POST_HOST:$POST_PORT\"]"
        # A fixed name: the default (this host's FQDN) may cost a DNS lookup.
        echo "hostname = \"listgate.bench.test\""
        echo
        echo "[delivery]"
        echo "smarthost = \"smtp://$SINK_HOST:$SINK_PORT\""
        # Mailman talks plain SMTP to its smarthost too; smtp-sink has no TLS.
        echo "starttls = \"never\""
        echo
        echo "[log]"
        echo "level = \"${LISTGATE_BENCH_LOG_LEVEL:-INFO}\""
        if [ -n "${LISTGATE_BENCH_CONFIG_EXTRA:-}" ]; then
            echo
            printf '%b\n' "$LISTGATE_BENCH_CONFIG_EXTRA"
        fi
    } > "$CFG.tmp"
    mv "$CFG.tmp" "$CFG"
}

fresh_store() {
    if [ -z "${LISTGATE_BENCH_STORE_URL:-}" ]; then
        # Leftovers of an interrupted run would be worked on while the bench
        # prepares the next one; a fresh SQLite file is the simplest clean slate.
        rm -f "$SQLITE_DB" "$SQLITE_DB-wal" "$SQLITE_DB-shm" "$SQLITE_DB-journal"
    fi
    lg init >&2
    if [ -n "${LISTGATE_BENCH_STORE_URL:-}" ]; then
        # Shared server: drop only what is queued (as sut-mailman.sh empties its queues).
        "$PYTHON" - "$STORE_URL" >&2 <<'EOF'
import sys
import sqlalchemy as sa
url = sys.argv[1]
if url.startswith(("postgresql://", "postgres://")):
    url = "postgresql+psycopg://" + url.split("://", 1)[1]
with sa.create_engine(url).begin() as conn:
    n = sum(conn.execute(sa.text(f"DELETE FROM {t}")).rowcount for t in ("outbound", "work"))
print(f"sut-listgate: deleted {n} queue rows left from an earlier run")
EOF
    fi
}

probe_rcpt() {  # list -> 0 once intake accepts RCPT TO:<list> (the daemon knows the list)
    python3 - "$POST_HOST" "$POST_PORT" "$PROTO" "$1" <<'EOF'
import smtplib, sys
host, port, proto, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = (smtplib.LMTP if proto == "lmtp" else smtplib.SMTP)(host, port, timeout=10)
try:
    c.ehlo_or_helo_if_needed()  # LHLO on LMTP
    c.mail("m00000@example.net")  # the bench's poster
    code, _ = c.rcpt(rcpt)
    c.rset()
finally:
    c.quit()
sys.exit(0 if code == 250 else 1)
EOF
}

sync_members() {  # list m mode -> the list has exactly m00000..m{m-1}, all in mode, enabled
    local list="$1" m="$2" mode="$3" now="$STATE/members.now" extra="$STATE/members.remove" kept
    local csv="$STATE/members-$2-$3.csv"
    # Each `listgate` command costs a second or more of start-up: call as few as we can.
    if ! lg members ls "$list" > "$now" 2> "$STATE/members.err"; then
        grep -q "no list" "$STATE/members.err" || { cat "$STATE/members.err" >&2; return 1; }
        lg lists create "$list" --name Bench >&2
        : > "$now"
    fi
    # The poster must not be moderated (Mailman's side sets default_member_action =
    # accept): a moderator's posts skip the first-post hold. Checked once per start.
    if [ ! -f "$STATE/poster-ok.$list" ]; then
        if ! grep -q "^$POSTER[[:space:]].*moderator" <<< "$(lg roles ls "$list")"; then
            lg roles add "$list" "$POSTER" moderator >&2
        fi
        : > "$STATE/poster-ok.$list"
    fi
    # Members that must go: not in the wanted range, not in the mode, or disabled.
    # (`members ls` prints "address  mode[ (disabled)]  name"; rich expands the tabs.)
    kept="$(awk -v m="$m" -v mode="$mode" -v extra="$extra" '
        BEGIN { printf "" > extra; kept = 0 }
        { addr = $1; ok = 0
          if (addr ~ /^m[0-9]+@example\.net$/) {
              n = substr(addr, 2, index(addr, "@") - 2) + 0
              ok = (n < m && addr == sprintf("m%05d@example.net", n) && $2 == mode &&
                    $0 !~ /\(disabled\)/)
          }
          if (ok) kept++; else if (addr != "") print addr > extra }
        END { print kept }' "$now")"
    if [ -s "$extra" ]; then
        log "removing $(wc -l < "$extra") members from $list"
        xargs -a "$extra" -n 5000 "$LISTGATE_BIN" --config "$CFG" members remove "$list" \
            > /dev/null
    fi
    if [ "$kept" -lt "$m" ]; then
        awk -v m="$m" -v mode="$mode" \
            'BEGIN { for (i = 0; i < m; i++) printf "m%05d@example.net,,%s\n", i, mode }' \
            > "$csv"
        lg members import "$list" "$csv" >&2
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
start)
    if p="$(serve_pid)"; then
        log "already running (pid $p)"; exit 0
    fi
    if port_open "$POST_HOST" "$POST_PORT"; then
        log "port $POST_PORT is already in use; pick another (POST_PORT)"; exit 1
    fi
    [ -x "$LISTGATE_BIN" ] || { log "no listgate at $LISTGATE_BIN (set LISTGATE_BIN)"; exit 1; }
    write_config
    rm -f "$STATE"/poster-ok.*
    fresh_store
    if [ -f "$LOGFILE" ]; then mv "$LOGFILE" "$LOGFILE.prev"; fi
    # Own fds for the daemon: a caller reading our stdout must not wait for it.
    "$LISTGATE_BIN" --config "$CFG" serve >"$LOGFILE" 2>&1 </dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 300); do
        if ! p="$(serve_pid)"; then
            log "listgate serve exited at start; the end of $LOGFILE:"
            tail -20 "$LOGFILE" >&2; exit 1
        fi
        if port_open "$POST_HOST" "$POST_PORT"; then
            log "started (pid $p, $PROTO on $POST_HOST:$POST_PORT, store $SHOWN_URL)"; exit 0
        fi
        sleep 0.2
    done
    log "did not come up in 60s; see $LOGFILE"; exit 1
    ;;
stop)
    p="$(serve_pid)" || { log "not running"; exit 0; }
    kill -TERM "$p"
    # serve finishes transactions in flight (up to 30 s) before it exits.
    for _ in $(seq 1 300); do
        kill -0 "$p" 2>/dev/null || { rm -f "$PIDFILE"; log "stopped"; exit 0; }
        sleep 0.2
    done
    log "pid $p still alive after 60s; sending SIGKILL to it (our own process)"
    kill -KILL "$p" 2>/dev/null || true
    rm -f "$PIDFILE"
    ;;
prepare)
    list="${1:?prepare LIST M MODE}"; members="${2:?prepare LIST M MODE}"; mode="${3:-regular}"
    case "$mode" in
        regular) ;;
        mime|plain) mode="digest-$mode" ;;
        *) log "prepare: unknown mode $mode (regular, mime or plain)"; exit 2 ;;
    esac
    sync_members "$list" "$members" "$mode"
    if [ "$mode" != regular ]; then
        # One digest of all the bench's posts, sent by digest-send: not early ones as the
        # batch fills (the defaults send at 50 posts or 1 MB).
        lg lists set "$list" --digest-max-posts 0 --digest-max-bytes 0 >&2
        if p="$(serve_pid)"; then kill -HUP "$p"; sleep 1; fi
    fi
    if [ -n "${LISTGATE_BENCH_PERSONALIZE:-}" ]; then
        lg lists set "$list" --personalize "$LISTGATE_BENCH_PERSONALIZE" >&2
        if p="$(serve_pid)"; then kill -HUP "$p"; sleep 1; fi  # re-read the lists now
    fi
    # The daemon re-reads the list directory every few seconds: posts sent before it
    # knows a new list would get 550 at RCPT. Wait until it routes the list.
    for _ in $(seq 1 60); do
        probe_rcpt "$list" 2>/dev/null && { log "prepared $list with $members members"; exit 0; }
        sleep 0.5
    done
    log "intake still refuses RCPT TO:<$list> after 30s; see $LOGFILE"; exit 1
    ;;
wait-idle)
    "$PYTHON" "$HERE/queue_depth.py" "$STORE_URL" --wait "${1:-600}"
    ;;
digest-send)
    lg digest send "${1:?digest-send LIST}" >&2
    ;;
pids)
    serve_pid || { log "not running"; exit 1; }
    ;;
check)
    echo "queue: $("$PYTHON" "$HERE/queue_depth.py" "$STORE_URL")"
    if [ -s "$LOGFILE" ]; then
        echo "log: $(grep -c ' delivered ' "$LOGFILE" || true) delivered transactions," \
             "$(grep -cE ' (deferred|failed|expired) ' "$LOGFILE" || true) deferred/failed," \
             "$(grep -c 'refused rcpt' "$LOGFILE" || true) refused RCPTs"
        grep -E " (ERROR|WARNING|CRITICAL) |Traceback" "$LOGFILE" | tail -5 || true
    fi
    ;;
*)
    sed -n '2,34p' "$0" >&2
    exit 2
    ;;
esac
