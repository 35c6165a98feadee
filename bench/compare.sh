#!/usr/bin/env bash
# Listgate and GNU Mailman side by side: one run, same machine, same client and sink.
#
#   bench/compare.sh [options]        both systems, M by M (the order alternates per M)
#   bench/compare.sh --smoke          Listgate alone, tiny (M=1,10; N=20; 1 repeat): for CI;
#                                     exits 0 with a message when smtp-source/smtp-sink
#                                     or bench.py are missing, 1 if a run is incomplete
#
# Options (the first five pass through to bench.py):
#   --members 1,100,1000   --posts 200   --repeats 3   --workloads fanout
#   --quiet-wait SECS      wait for an idle machine before each timed run
#   --proto smtp|lmtp      how Listgate takes posts (default smtp; Mailman always gets LMTP)
#   --only listgate|mailman
#   -- ARGS...             anything else for bench.py (e.g. --sessions 8 --size 4096)
#
# Results: bench/results/<time>/{mailman,listgate}.jsonl, ratios.md (bench/ratios.py) and
# report.md (the peer's report.py).
#
# Environment: BENCH_PY (default /work/shared/peers/mailman/bench.py, next to sut-mailman.sh
# and report.py), PEERS_DIR (/tmp/peers; Mailman's venv must be there: run the peer's
# setup.sh), SINK_PORT (18025), MAILMAN_POST_PORT (18024), LISTGATE_POST_PORT (18026),
# LISTGATE_BIN, LISTGATE_BENCH_STORE_URL and the MM_* knobs of sut-mailman.sh.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
BENCH_PY="${BENCH_PY:-/work/shared/peers/mailman/bench.py}"
PEER_DIR="$(dirname "$BENCH_PY")"
LISTGATE_BIN="${LISTGATE_BIN:-$HERE/../.venv/bin/listgate}"
export LISTGATE_BIN

say() { echo "compare: $*" >&2; }
usage() { sed -n '2,24p' "$0" >&2; exit 2; }

args="$*"
smoke=0 members="1,100,1000" posts=200 repeats=3 workloads=fanout quiet=0 proto=smtp only=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --smoke) smoke=1 ;;
    --members) members="${2:?}"; shift ;;
    --posts) posts="${2:?}"; shift ;;
    --repeats) repeats="${2:?}"; shift ;;
    --workloads) workloads="${2:?}"; shift ;;
    --quiet-wait) quiet="${2:?}"; shift ;;
    --proto) proto="${2:?}"; shift ;;
    --only) only="${2:?}"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage ;;
    *) say "unknown option $1"; usage ;;
    esac
    shift
done
case "$proto" in smtp|lmtp) ;; *) say "--proto must be smtp or lmtp"; exit 2 ;; esac
case "$only" in ""|listgate|mailman) ;; *) say "--only must be listgate or mailman"; exit 2 ;; esac

have() {  # an executable file named $1 on PATH or in /usr/sbin (where Debian puts postfix's)
    local p
    for p in "$(command -v "$1" 2>/dev/null || true)" "/usr/sbin/$1"; do
        [ -n "$p" ] && [ -f "$p" ] && [ -x "$p" ] && return 0
    done
    return 1
}

if [ "$smoke" = 1 ]; then
    if ! have smtp-source || ! have smtp-sink; then
        say "skipped: smtp-source/smtp-sink not installed (Debian package postfix)"; exit 0
    fi
    if [ ! -f "$BENCH_PY" ]; then
        say "skipped: no bench driver at $BENCH_PY (set BENCH_PY)"; exit 0
    fi
    members=1,10 posts=20 repeats=1 workloads=fanout only=listgate
    # Ports and state of its own, so that a smoke run never meets a full comparison.
    SINK_PORT="${SINK_PORT:-18125}" LISTGATE_POST_PORT="${LISTGATE_POST_PORT:-18126}"
    PEERS_DIR="${PEERS_DIR:-$(mktemp -d /tmp/listgate-smoke.XXXXXX)}"
    # smtp-sink runs as nobody and must reach its dump file under here.
    chmod 755 "$PEERS_DIR"
    extra+=(--timeout 120)
else
    [ -f "$BENCH_PY" ] || { say "no bench driver at $BENCH_PY (set BENCH_PY)"; exit 1; }
    if ! have smtp-source || ! have smtp-sink; then
        say "WARNING: no smtp-source/smtp-sink: bench.py falls back to its Python client and sink"
    fi
fi
PEERS_DIR="${PEERS_DIR:-/tmp/peers}"
SINK_PORT="${SINK_PORT:-18025}"
MAILMAN_POST_PORT="${MAILMAN_POST_PORT:-18024}"
LISTGATE_POST_PORT="${LISTGATE_POST_PORT:-18026}"
export PEERS_DIR

[ -x "$LISTGATE_BIN" ] || { say "no listgate at $LISTGATE_BIN (make install, or set LISTGATE_BIN)"; exit 1; }
if [ "$only" != listgate ] && [ ! -x "$PEERS_DIR/mailman-venv/bin/mailman" ]; then
    say "no Mailman in $PEERS_DIR/mailman-venv: run $PEER_DIR/setup.sh first (or --only listgate)"
    exit 1
fi

lg_workloads="$workloads"

version="$("$(dirname "$LISTGATE_BIN")/python" -c \
    'import importlib.metadata as m; print(m.version("listgate"))' 2>/dev/null || echo unknown)"
commit="$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || true)"
lg_label="listgate-$version${commit:++$commit}-$proto${LISTGATE_BENCH_PERSONALIZE:+-personalize-$LISTGATE_BENCH_PERSONALIZE}${LISTGATE_DAEMON_PROCESSES:+-processes-$LISTGATE_DAEMON_PROCESSES}"
mm_label="mailman-3.3.10${MM_SLEEP_TIME:+-sleep$MM_SLEEP_TIME}"

stamp="$(date +%Y%m%d-%H%M%S)"
out="$HERE/results/$stamp$([ "$smoke" = 1 ] && echo -smoke || true)"
mkdir -p "$out"
say "results -> $out"
{
    echo "# $(date -Is) $(uname -srm), $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# bench/compare.sh $args"
    echo "# members=$members posts=$posts repeats=$repeats workloads=$workloads proto=$proto"
    env | grep -E '^(LISTGATE_|MM_)' | sort | sed 's/^/# env /' || true
} > "$out/run.txt"

failed=0
common=(--posts "$posts" --repeats "$repeats" --state-dir "$PEERS_DIR" --sink-port "$SINK_PORT"
        --quiet-wait "$quiet")

run_mailman() {  # M[,M...]
    python3 "$BENCH_PY" --sut "$PEER_DIR/sut-mailman.sh" --label "$mm_label" \
        --post-proto lmtp --post-port "$MAILMAN_POST_PORT" --members "$1" \
        --workloads "$workloads" "${common[@]}" "${extra[@]}" >> "$out/mailman.jsonl" ||
        { say "Mailman bench failed for M=$1"; failed=1; }
}

run_listgate() {  # M[,M...]
    [ -n "$lg_workloads" ] || return 0
    BENCH_POST_PROTO="$proto" python3 "$BENCH_PY" --sut "$HERE/sut-listgate.sh" \
        --label "$lg_label" --post-proto "$proto" --post-port "$LISTGATE_POST_PORT" \
        --members "$1" --workloads "$lg_workloads" "${common[@]}" "${extra[@]}" \
        >> "$out/listgate.jsonl" ||
        { say "Listgate bench failed for M=$1 (log: $PEERS_DIR/listgate/serve.log)"; failed=1; }
}

# Both systems: M by M, so that they meet the same background load; who goes first
# alternates, so that neither always runs on a machine the other just warmed.
# One system: one bench.py for all M (one start and stop).
i=0
if [ "$only" = mailman ]; then
    run_mailman "$members"
elif [ "$only" = listgate ]; then
    run_listgate "$members"
else for m in ${members//,/ }; do
    if [ $((i % 2)) = 0 ]; then
        run_mailman "$m"; run_listgate "$m"
    else
        run_listgate "$m"; run_mailman "$m"
    fi
    i=$((i + 1))
done; fi

files=()
for f in "$out/mailman.jsonl" "$out/listgate.jsonl"; do [ -s "$f" ] && files+=("$f"); done
[ ${#files[@]} -gt 0 ] || { say "no results"; exit 1; }
if [ -f "$PEER_DIR/report.py" ]; then python3 "$PEER_DIR/report.py" "${files[@]}" > "$out/report.md"; fi
python3 "$HERE/ratios.py" "${files[@]}" | tee "$out/ratios.md"

if [ -s "$out/listgate.jsonl" ]; then
    runs=$(( $(echo "$members" | tr ',' '\n' | grep -c .) * repeats
             * $(echo "$lg_workloads" | tr ',' '\n' | grep -c .) ))
    python3 "$HERE/ratios.py" --check --expect-runs "$runs" "$out/listgate.jsonl" || failed=1
elif [ "$only" != mailman ] && [ -n "$lg_workloads" ]; then
    failed=1
fi
if [ -s "$out/mailman.jsonl" ]; then
    runs=$(( $(echo "$members" | tr ',' '\n' | grep -c .) * repeats
             * $(echo "$workloads" | tr ',' '\n' | grep -c .) ))
    python3 "$HERE/ratios.py" --check --sut mailman --expect-runs "$runs" "$out/mailman.jsonl" ||
        failed=1
fi
if [ "$smoke" = 1 ] && [ "$failed" = 0 ] && [[ "$PEERS_DIR" == /tmp/listgate-smoke.* ]]; then
    rm -rf "$PEERS_DIR"
fi
[ "$failed" = 0 ] || say "FAILED: see above and $out"
exit "$failed"
