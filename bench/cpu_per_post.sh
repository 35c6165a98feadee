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
# posts came in and until idle, and per post. Environment as for sut-listgate.sh, e.g.
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
HZ="$(getconf CLK_TCK)"

before=($(ticks)); t0="$(date +%s.%N)"
"${SOURCE[@]}" -m "$POSTS" "127.0.0.1:$POST_PORT"
t1="$(date +%s.%N)"; taken=($(ticks))
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
