#!/usr/bin/env bash
# The load benchmark of issue 6. One command:   bash bench/load.sh
#
# Builds release, then side by side in one run, on 127.0.0.1 only:
#   - the bare warp baseline (examples/bare_warp.rs: token check + serde_json parse + 200),
#   - the durable floor: the same server writing each body to a preallocated file, answering after
#     a group fdatasync (bare_warp with a FILE argument) -- the least any durable receiver pays here,
#   - the release callnotify daemon with a temporary store, one rule and a local Slack stand-in
#     (examples/bench_sink.rs, answers at once; max_per_second: 0),
# drives each with wrk at 1, 16 and 64 connections (the fixture, a Bearer token, a new `sid` on
# every request) and prints requests/s, p50/p99 answer latency, server CPU per request, the
# callnotify/baseline and callnotify/floor ratios,
# idle and peak RSS, and end-to-end delivery latency (receipt to the sink's 200, from the
# daemon's callnotify_delivery_latency_seconds histogram) and the time to drain the backlog.
# Then the same load with a Slack that hangs for 30 s on every request. Then, at 16 connections,
# every call delivered as it arrives: the delivery floor (bare_warp with BENCH_FORWARD: each call
# POSTed to a stand-in by a spawned task, nothing stored) against callnotify with its Slack
# channel at concurrency 16, each with its own stand-in, until the stand-in has every call.
#
# Knobs (environment): DURATION (seconds per wrk run, default 5), CONNS ("1 16 64"),
# THREADS (wrk threads, default 2), HANG (1 = run the hanging-Slack case, default 1),
# FORWARD (1 = run the delivered-as-it-arrives case, default 1),
# CONCURRENCY (deliveries in flight for the Slack channel, default 1), LOG_LEVEL (default info).
# SOAK=SECONDS instead runs one long wrk run against callnotify alone (SOAK_CONNS connections,
# default 4) and prints its RSS and the delivery backlog every 30 s, to show memory stays flat:
#   SOAK=600 CONCURRENCY=16 bash bench/load.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-5}
CONNS=${CONNS:-"1 16 64"}
THREADS=${THREADS:-2}
HANG=${HANG:-1}
FORWARD=${FORWARD:-1}
CONCURRENCY=${CONCURRENCY:-1}
LOG_LEVEL=${LOG_LEVEL:-info}
TOKEN=bench-token
FIXTURE="$ROOT/tests/fixtures/post_call_data.json"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

echo "== building (cargo build --release --examples --bins)" >&2
cargo build --release --examples --bins >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release" # where cargo just built

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# Starts a helper server in the background (quiet); its pid is in BG_PID and stopped at exit.
background() {
    "$@" 2>/dev/null &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (bounded) until a TCP port accepts connections.
wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

# The kernel brings VmHWM up to date only at some points (unmapping, exit), so it can read lower
# than an RSS the process had; a sampler also keeps the highest VmRSS/VmHWM seen every 0.2 s.
watch_peak() { # $1 = pid; runs in the background while the process lives
    local max=0 v
    while kill -0 "$1" 2>/dev/null; do
        for v in $(awk '$1 == "VmRSS:" || $1 == "VmHWM:" {print $2}' "/proc/$1/status" 2>/dev/null); do
            if [ "$v" -gt "$max" ]; then max=$v; fi
        done
        echo "$max" >"$TMP/peak.$1"
        sleep 0.2
    done
}
peak_kb() { # $1 = pid: the highest RSS seen, in kB
    local hwm seen
    hwm=$(kb "$1" VmHWM)
    seen=$(cat "$TMP/peak.$1" 2>/dev/null || echo 0)
    echo $((hwm > seen ? hwm : seen))
}
mb() { awk -v v="$1" 'BEGIN { printf "%.1f MB", v / 1024 }'; }

# A wrk script that gives every request a new sid (a counter per thread, a per-run prefix) and
# prints one machine-readable line at the end.
make_lua() { # $1 = run label, $2 = path
    local body
    body=$(python3 -c 'import json,sys; print(json.dumps(json.dumps(json.load(open(sys.argv[1])), separators=(",", ":"))))' "$FIXTURE")
    cat >"$TMP/$1.lua" <<EOF
local body = $body
local sid = "CAec7g2x30425ba039a83ffb4286754983"
local a, b = string.find(body, sid, 1, true)
local pre, post = string.sub(body, 1, a - 1), string.sub(body, b + 1)
-- tid is a global each thread gets from setup(); the counter is per thread.
local counter = 0
tid = 0
local n = 0
function setup(thread)
  n = n + 1
  thread:set("tid", n)
end
wrk.method = "POST"
wrk.path = "$2"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, pre .. "$1-" .. tid .. "-" .. counter .. post)
end
function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local bad = summary.errors.status + summary.errors.connect + summary.errors.read
            + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %.0f %d %d %d\n", summary.requests, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), bad))
end
EOF
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system CPU, in clock ticks
HZ=$(getconf CLK_TCK)

# Runs wrk; prints "requests rps p50_us p99_us errors cpu_us_per_request" (the server's CPU).
drive() { # $1 = port, $2 = connections, $3 = label, $4 = path, $5 = server pid
    make_lua "$3" "$4"
    local t=$THREADS before
    [ "$2" -lt "$t" ] && t=$2
    before=$(ticks "$5")
    wrk -t"$t" -c"$2" -d"${DURATION}s" --timeout 10s -s "$TMP/$3.lua" "http://127.0.0.1:$1" \
        >"$TMP/$3.out"
    awk -v cpu=$(( $(ticks "$5") - before )) -v hz="$HZ" '/^RESULT/ {
        printf "%d %d %d %d %d %.0f\n", $2, $3, $4, $5, $6, ($2 > 0 ? cpu * 1e6 / hz / $2 : 0) }' \
        "$TMP/$3.out"
}

metric() { # $1 = port, $2 = metric line prefix (name{labels})
    curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($0, m) == 1 {s += $NF} END {printf "%d\n", s}'
}

# Approximate quantile from the Prometheus histogram buckets (upper bound of the bucket).
latency_quantiles() { # $1 = port
    curl -s "http://127.0.0.1:$1/metrics" | awk '
      /^callnotify_delivery_latency_seconds_bucket/ {
        match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5)
        cum[le] += $NF; if (!(le in seen)) { seen[le] = 1; order[++k] = le } }
      /^callnotify_delivery_latency_seconds_sum/ { sum += $NF }
      /^callnotify_delivery_latency_seconds_count/ { cnt += $NF }
      END {
        if (cnt == 0) { print "no deliveries recorded"; exit }
        p50 = ""; p99 = ""
        for (i = 1; i <= k; i++) {
          if (p50 == "" && cum[order[i]] >= 0.5 * cnt) p50 = order[i]
          if (p99 == "" && cum[order[i]] >= 0.99 * cnt) p99 = order[i]
        }
        printf "%d delivered, mean %.1f ms, p50 <= %s s, p99 <= %s s\n", cnt, 1000 * sum / cnt, p50, p99 }'
}

write_config() { # $1 = file, $2 = listen port, $3 = sink port, $4 = store
    cat >"$1" <<EOF
server:
  listen: "127.0.0.1:$2"
  webhook_path: "/webhooks/air"
  tokens: ["$TOKEN"]
store:
  path: "$4"
templates_dir: "$ROOT/templates"
delivery:
  request_timeout: 60s
channels:
  sales: { type: slack, webhook_url: "http://127.0.0.1:$3/hook", max_per_second: 0, concurrency: $CONCURRENCY }
rules:
  - name: every_call
    notify:
      - channel: sales
        template: slack/summary
EOF
}

start_daemon() { # $1 = config, $2 = log; sets DAEMON_PID
    "$BIN/callnotify" --config "$1" --log-level "$LOG_LEVEL" serve >"$2" 2>&1 &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
    watch_peak "$DAEMON_PID" &
    PIDS+=("$!")
}

# Starts a Slack stand-in (mode: ok, or hang SECONDS) and a daemon delivering to it, with
# $TMP/LABEL.yaml, .db and .log; sets SINK_PORT, SINK_PID, CN_PORT and CN_PID.
sink_and_daemon() { # $1 = label, $2... = stand-in mode
    local label=$1
    shift
    SINK_PORT=$(free_port)
    background "$BIN/examples/bench_sink" "127.0.0.1:$SINK_PORT" "$@"
    SINK_PID=$BG_PID
    CN_PORT=$(free_port)
    write_config "$TMP/$label.yaml" "$CN_PORT" "$SINK_PORT" "$TMP/$label.db"
    start_daemon "$TMP/$label.yaml" "$TMP/$label.log"
    CN_PID=$DAEMON_PID
    wait_port "$SINK_PORT"
    wait_port "$CN_PORT"
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

BASE_PORT=$(free_port)
background "$BIN/examples/bare_warp" "127.0.0.1:$BASE_PORT" "$TOKEN"
BASE_PID=$BG_PID
watch_peak "$BASE_PID" &
PIDS+=("$!")
DUR_PORT=$(free_port)
background "$BIN/examples/bare_warp" "127.0.0.1:$DUR_PORT" "$TOKEN" "$TMP/floor.journal"
DUR_PID=$BG_PID
sink_and_daemon callnotify ok
wait_port "$BASE_PORT"
wait_port "$DUR_PORT"
sleep 1
BASE_IDLE=$(kb "$BASE_PID" VmRSS)
CN_IDLE=$(kb "$CN_PID" VmRSS)

if [ -n "${SOAK:-}" ]; then
    SOAK_CONNS=${SOAK_CONNS:-4}
    echo "== soak: ${SOAK}s at $SOAK_CONNS connections, Slack stand-in concurrency $CONCURRENCY; idle RSS $(mb "$CN_IDLE")"
    DURATION=$SOAK drive "$CN_PORT" "$SOAK_CONNS" soak /webhooks/air "$CN_PID" >"$TMP/soak.result" &
    WRK_PID=$!
    START=$(date +%s)
    while kill -0 "$WRK_PID" 2>/dev/null; do
        sleep 30
        kill -0 "$WRK_PID" 2>/dev/null || break
        echo "t=$(( $(date +%s) - START ))s RSS $(mb "$(kb "$CN_PID" VmRSS)") (peak $(mb "$(peak_kb "$CN_PID")")), sink received $(curl -s "http://127.0.0.1:$SINK_PORT/count"), accepted $(metric "$CN_PORT" 'callnotify_calls_received_total{result="accepted"}')"
    done
    wait "$WRK_PID" || true
    read -r creq crps cp50 cp99 cerr ccpu <"$TMP/soak.result"
    echo "soak: $creq requests, $crps req/s, p50 $((cp50 / 1000)) ms, p99 $((cp99 / 1000)) ms, errors $cerr, daemon CPU ${ccpu} µs per request (receipt and delivery)"
    echo "RSS at the end $(mb "$(kb "$CN_PID" VmRSS)"), peak $(mb "$(peak_kb "$CN_PID")"); store $(du -sh "$TMP" | cut -f1)"
    exit 0
fi

echo "== $(nproc) cores, $(uname -r), wrk $THREADS threads, ${DURATION}s per run, fixture $(wc -c <"$FIXTURE") bytes"
echo "== Slack stand-in: concurrency $CONCURRENCY, max_per_second 0; daemon log level $LOG_LEVEL"
echo "== each cell: requests/s (p50/p99 answer ms) server CPU µs per request [errors]"
printf "%-5s | %-34s | %-34s | %-34s | %s\n" conns "bare warp (baseline)" "durable floor (write+fdatasync)" \
    "callnotify" "ratio to baseline / to floor"
us_ms() { awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; }
cell() { # rps p50_us p99_us cpu_us errors
    printf "%7s (%s/%s) %4sµs [%s]" "$1" "$(us_ms "$2")" "$(us_ms "$3")" "$4" "$5"
}
# One table row from the last baseline (b*), floor (f*) and callnotify (c*) runs.
row() { # $1 = connections
    printf "%-5s | %-34s | %-34s | %-34s | %s / %s\n" "$1" \
        "$(cell "$brps" "$bp50" "$bp99" "$bcpu" "$berr")" \
        "$(cell "$frps" "$fp50" "$fp99" "$fcpu" "$ferr")" \
        "$(cell "$crps" "$cp50" "$cp99" "$ccpu" "$cerr")" \
        "$(awk -v a="$crps" -v b="$brps" 'BEGIN { printf "%.2f", a / b }')" \
        "$(awk -v a="$crps" -v b="$frps" 'BEGIN { printf "%.2f", a / b }')"
}
TOTAL=0
LOAD_END=0
for c in $CONNS; do
    read -r _ brps bp50 bp99 berr bcpu < <(drive "$BASE_PORT" "$c" "base$c" /webhooks/air "$BASE_PID")
    read -r _ frps fp50 fp99 ferr fcpu < <(drive "$DUR_PORT" "$c" "floor$c" /webhooks/air "$DUR_PID")
    read -r creq crps cp50 cp99 cerr ccpu < <(drive "$CN_PORT" "$c" "cn$c" /webhooks/air "$CN_PID")
    TOTAL=$((TOTAL + creq))
    LOAD_END=$(date +%s.%N)
    row "$c"
done
ACCEPTED=$(metric "$CN_PORT" 'callnotify_calls_received_total{result="accepted"}')
DUPS=$(metric "$CN_PORT" 'callnotify_calls_received_total{result="duplicate"}')
# The store is the truth: a call whose client hung up at the end of a wrk run is stored but its
# handler (and the "accepted" counter) may not finish.
sleep 1
store_count() { # $1 = db, $2 = table
    python3 -c 'import sqlite3,sys; c=sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True); print(c.execute("select count(*) from "+sys.argv[2]).fetchone()[0])' "$1" "$2"
}
STORED=$(store_count "$TMP/callnotify.db" calls)
OWED=$(store_count "$TMP/callnotify.db" deliveries)
echo "calls accepted $ACCEPTED (duplicates $DUPS) of $TOTAL requests wrk counted; in the store: $STORED calls, $OWED deliveries"

# Drain: wait (bounded, 300 s) until the sink has every notification the store owes.
DRAINED=""
for _ in $(seq 1 3000); do
    got=$(curl -s "http://127.0.0.1:$SINK_PORT/count")
    if [ "${got:-0}" -ge "$OWED" ]; then
        DRAINED=$(awk -v s="$LOAD_END" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
        break
    fi
    sleep 0.1
done
echo "backlog: sink received $(curl -s "http://127.0.0.1:$SINK_PORT/count") POSTs for $OWED deliveries;" \
    "drained ${DRAINED:-NOT within 300}s after the last wrk run ended;" \
    "attempts recorded $(store_count "$TMP/callnotify.db" attempts)"
echo "end-to-end delivery latency: $(latency_quantiles "$CN_PORT")"
echo "RSS idle:  baseline $(mb "$BASE_IDLE"), callnotify $(mb "$CN_IDLE")"
echo "RSS peak:  baseline $(mb "$(peak_kb "$BASE_PID")"), callnotify $(mb "$(peak_kb "$CN_PID")") (VmHWM, and VmRSS sampled every 0.2 s)"
echo "RSS after: callnotify $(mb "$(kb "$CN_PID" VmRSS)")"
echo "store: $(du -h "$TMP/callnotify.db"* | awk '{print $1}' | paste -sd+ -) ($(ls "$TMP" | grep -c db) files)"
stop "$CN_PID"
stop "$SINK_PID"

if [ "$HANG" = 1 ]; then
    sink_and_daemon hang hang 30
    sleep 1
    echo "== Slack hangs 30 s on every request (16 connections)"
    read -r _ brps bp50 bp99 berr bcpu < <(drive "$BASE_PORT" 16 "hbase" /webhooks/air "$BASE_PID")
    read -r _ frps fp50 fp99 ferr fcpu < <(drive "$DUR_PORT" 16 "hfloor" /webhooks/air "$DUR_PID")
    read -r creq crps cp50 cp99 cerr ccpu < <(drive "$CN_PORT" 16 "hang" /webhooks/air "$CN_PID")
    row 16
    echo "hanging sink got $(curl -s --max-time 2 "http://127.0.0.1:$SINK_PORT/count") requests;" \
        "callnotify RSS peak $(mb "$(peak_kb "$CN_PID")"), now $(mb "$(kb "$CN_PID" VmRSS)")"
    stop "$CN_PID"
    stop "$SINK_PID"
fi

# Waits (bounded, 120 s) until the stand-in on port $1 has $2 POSTs; prints how many it has.
sink_reaches() {
    local got=0
    for _ in $(seq 1 1200); do
        got=$(curl -s "http://127.0.0.1:$1/count")
        [ "${got:-0}" -ge "$2" ] && break
        sleep 0.1
    done
    echo "$got"
}
if [ "$FORWARD" = 1 ]; then
    echo "== every call delivered as it arrives (16 connections): the delivery floor (no store; each"
    echo "   call POSTed to a stand-in) and callnotify with its Slack channel at concurrency 16"
    FWD_SINK=$(free_port)
    background "$BIN/examples/bench_sink" "127.0.0.1:$FWD_SINK" ok
    FWD_SINK_PID=$BG_PID
    FWD_PORT=$(free_port)
    BENCH_FORWARD="http://127.0.0.1:$FWD_SINK/services/T0/B0/bench" \
        background "$BIN/examples/bare_warp" "127.0.0.1:$FWD_PORT" "$TOKEN"
    FWD_PID=$BG_PID
    CONCURRENCY=16 sink_and_daemon paced ok
    wait_port "$FWD_SINK"
    wait_port "$FWD_PORT"
    sleep 1
    read -r _ brps bp50 bp99 berr bcpu < <(drive "$BASE_PORT" 16 "pbase" /webhooks/air "$BASE_PID")
    read -r freq frps fp50 fp99 ferr fcpu < <(drive "$FWD_PORT" 16 "pfloor" /webhooks/air "$FWD_PID")
    fsink=$(sink_reaches "$FWD_SINK" "$freq")
    read -r creq crps cp50 cp99 cerr ccpu < <(drive "$CN_PORT" 16 "paced" /webhooks/air "$CN_PID")
    csink=$(sink_reaches "$SINK_PORT" "$creq")
    printf "%-5s | %-34s | %-34s | %-34s | %s\n" conns "bare warp (baseline)" "delivery floor (POST, no store)" \
        "callnotify, concurrency 16" "ratio to baseline / to floor"
    row 16
    echo "stand-in CPU not counted above; the delivery floor's stand-in got $fsink POSTs for $freq requests," \
        "callnotify's $csink for $creq; callnotify RSS peak $(mb "$(peak_kb "$CN_PID")")"
    stop "$CN_PID"
    stop "$SINK_PID"
    stop "$FWD_PID"
    stop "$FWD_SINK_PID"
fi
stop "$BASE_PID"
stop "$DUR_PID"
