#!/usr/bin/env bash
# CPU per post of each Listgate process, and how long the stages take to catch up.
#
#   bench/cpu_per_post.sh [PROCESSES] [POSTS] [MEMBERS]      (defaults: 2 2000 1)
#
# Starts Listgate with bench/sut-listgate.sh (its own state folder and ports: PEERS_DIR
# /tmp/peers-cpu, intake 18226, sink 18225, web 18227) with PROCESSES processes and a
# list of MEMBERS members, bulk copies, a Postfix smtp-sink as the smarthost. After 50
# untimed posts, sends POSTS posts of 1 KiB with `smtp-source -d -s 4` and waits until
# nothing is queued. Prints intake posts/s, the time until idle, and per process
# (supervisor first) the CPU seconds (user + system, /proc/PID/stat) used while the
# posts came in and until idle, and per post; then, while the posts came in, each
# thread that used CPU (a process's main thread runs its event loop; intake's other
# busy thread is the one that commits), and each CPU's busy, idle and I/O-wait time
# (/proc/stat). Environment as for sut-listgate.sh, e.g.
# LISTGATE_DAEMON_PIN_CPUS=false to let the kernel move the processes between CPUs.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PROCESSES="${1:-2}"
POSTS="${2:-2000}"
MEMBERS="${3:-1}"
export PEERS_DIR="${PEERS_DIR:-/tmp/peers-cpu}" POST_PORT=18226 SINK_PORT=18225
export LISTGATE_WEB_LISTEN=http://127.0.0.1:18227 LISTGATE_DAEMON_PROCESSES="$PROCESSES"
export LISTGATE_BENCH_PERSONALIZE="${LISTGATE_BENCH_PERSONALIZE:-off}"
SUT="$HERE/sut-listgate.sh"
LIST=bench@example.com
SOURCE=(smtp-source -d -s 4 -l 1024 -f m00000@example.net -t "$LIST")

for tool in smtp-source smtp-sink; do
    command -v "$tool" >/dev/null || { echo "missing $tool (Debian package postfix)" >&2; exit 1; }
done
sink_user=()
[ "$(id -u)" = 0 ] && sink_user=(-u nobody)
smtp-sink "${sink_user[@]}" "127.0.0.1:$SINK_PORT" 1024 2>/dev/null &
SINK=$!
trap '"$SUT" stop >/dev/null 2>&1 || true; kill $SINK 2>/dev/null || true' EXIT
"$SUT" start >/dev/null
"$SUT" prepare "$LIST" "$MEMBERS" regular >/dev/null
"${SOURCE[@]}" -m 50 "127.0.0.1:$POST_PORT"
"$SUT" wait-idle 600 >/dev/null

MAIN="$("$SUT" pids | head -1)"
PIDS=("$MAIN" $(pgrep -P "$MAIN" | sort -n || true))
ticks() { for p in "${PIDS[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }
# "PID TID user system" for every thread of every process; "cpuN busy idle iowait".
threads() { for p in "${PIDS[@]}"; do for t in /proc/"$p"/task/*; do
    awk -v p="$p" '{print p, $1, $14, $15}' "$t/stat" 2>/dev/null || true; done; done; }
cpus() { awk '/^cpu[0-9]/ {print $1, $2 + $3 + $4 + $7 + $8 + $9, $5, $6}' /proc/stat; }
HZ="$(getconf CLK_TCK)"

threads >"$PEERS_DIR/threads.0"; cpus >"$PEERS_DIR/cpus.0"
before=($(ticks)); t0="$(date +%s.%N)"
"${SOURCE[@]}" -m "$POSTS" "127.0.0.1:$POST_PORT"
t1="$(date +%s.%N)"; taken=($(ticks))
threads >"$PEERS_DIR/threads.1"; cpus >"$PEERS_DIR/cpus.1"
"$SUT" wait-idle 600 >/dev/null
t2="$(date +%s.%N)"; idle=($(ticks))

awk -v n="$POSTS" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN {
    printf "intake %.0f posts/s (%.2f s); idle %.2f s after the first post\n", n / (b - a), b - a, c - a }'
for i in "${!PIDS[@]}"; do
    role=$([ "$i" = 0 ] && echo "serve" || echo "worker $((i - 1))")
    [ "${#PIDS[@]}" = 1 ] && role="serve (one process)"
    awk -v r="$role" -v p="${PIDS[$i]}" -v hz="$HZ" -v n="$POSTS" \
        -v x="${before[$i]}" -v y="${taken[$i]}" -v z="${idle[$i]}" 'BEGIN {
        printf "%-20s pid %-7s CPU %.2f s while taking posts, %.2f s until idle: %.2f ms a post\n",
               r, p, (y - x) / hz, (z - x) / hz, (z - x) / hz * 1000 / n }'
done
echo "while taking posts, threads that used CPU (user + system):"
awk -v hz="$HZ" -v n="$POSTS" 'NR == FNR { u[$2] = $3; s[$2] = $4; next }
    ($2 in u) && ($3 + $4 > u[$2] + s[$2]) {
        printf "  pid %-7s thread %-7s %-11s user %.2f s, system %.2f s: %.0f us a post\n",
               $1, $2, ($1 == $2 ? "(main)" : ""), ($3 - u[$2]) / hz, ($4 - s[$2]) / hz,
               ($3 + $4 - u[$2] - s[$2]) / hz * 1e6 / n }' \
    "$PEERS_DIR/threads.0" "$PEERS_DIR/threads.1"
echo "while taking posts, each CPU:"
awk -v hz="$HZ" 'NR == FNR { b[$1] = $2; i[$1] = $3; w[$1] = $4; next }
    { printf "  %-5s busy %.2f s, idle %.2f s, I/O wait %.2f s\n", $1, ($2 - b[$1]) / hz,
             ($3 - i[$1]) / hz, ($4 - w[$1]) / hz }' "$PEERS_DIR/cpus.0" "$PEERS_DIR/cpus.1"
