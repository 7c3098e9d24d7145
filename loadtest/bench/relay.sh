#!/usr/bin/env bash
# Reproduces the relay table of BENCHMARKS.md: meshpunch-relay vs coturn vs the bare
# recvmmsg/sendmmsg forwarder, same load, same core, at 100 and 1200 bytes.
#
# Each server runs alone, pinned to CPU $SERVER_CPU with one worker thread; the load
# generator (sender + receiver threads) is pinned to CPU $GEN_CPU. For every server and size:
#   1. a fixed-rate run ($RATE pps for $DURATION): delivered pps, Mbit/s, loss, latency;
#   2. a maximum-rate search (--find-max, trials of $TRIAL each, loss limit 1 %).
# JSON results land in $OUT; a markdown table is printed at the end (bench/summarize.sh).
#
# Environment knobs (defaults in brackets):
#   SERVER_CPU [1]  GEN_CPU [0]  PIN [1] (PIN=0: no pinning, both share every core)
#   CLIENTS [16]  RATE [50000]  DURATION [5s]  TRIAL [2s]
#   NICE [-19]: niceness of server and generator (negative needs root), so that other work on
#   a shared machine (compilers) takes as little CPU from the measurement as possible
#   PATTERN [bulk] (realistic: see loadtest/README.md)  SIZES ["100 1200"]  SERVERS ["meshpunch coturn bare"]  OUT [target/bench-results]
set -euo pipefail
cd "$(dirname "$0")/../.."

SERVER_CPU=${SERVER_CPU:-1}
GEN_CPU=${GEN_CPU:-0}
PIN=${PIN:-1}
NICE=${NICE:--19}
CLIENTS=${CLIENTS:-16}
RATE=${RATE:-50000}
DURATION=${DURATION:-5s}
TRIAL=${TRIAL:-2s}
SIZES=${SIZES:-100 1200}
PATTERN=${PATTERN:-bulk}
SERVERS=${SERVERS:-meshpunch coturn bare}
OUT=${OUT:-target/bench-results}
SECRET=bench-secret
PORT=34790
export RUST_BACKTRACE=0

cargo build --release -q -p meshpunch-loadtest -p meshpunch-relay
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$OUT"
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

wait_line() { # file pattern
  for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "server did not start: $(cat "$1")" >&2; return 1
}

start_server() { # name -> sets SERVER_PID, MODE, AUTH
  case "$1" in
    meshpunch)
      cat >"$TMP/relay.toml" <<TOML
listen = "127.0.0.1:$PORT"
relay_ips = ["127.0.0.1"]
realm = "bench"
auth_secret = "$SECRET"
allow_loopback_peers = true
workers = 1
TOML
      nice -n "$NICE" taskset -c "$SERVER_CPU" "$BIN/meshpunch-relay" --config "$TMP/relay.toml" >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      wait_line "$TMP/server.log" "listening on"
      MODE=relay; AUTH=(--secret "$SECRET");;
    coturn)
      nice -n "$NICE" taskset -c "$SERVER_CPU" turnserver -n --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 -p "$PORT" \
        --use-auth-secret --static-auth-secret "$SECRET" --realm bench --allow-loopback-peers \
        --no-cli --no-tls --no-dtls --no-software-attribute -m 1 \
        --db "$TMP/turndb" --pidfile "$TMP/turnserver.pid" --log-file stdout --simple-log \
        >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      sleep 1.5
      MODE=relay; AUTH=(--secret "$SECRET");;
    bare)
      nice -n "$NICE" taskset -c "$SERVER_CPU" "$BIN/meshpunch-loadtest" forwarder --listen "127.0.0.1:$PORT" --threads 1 \
        >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      wait_line "$TMP/server.log" "listening on"
      MODE=bare; AUTH=();;
    *) echo "unknown server $1" >&2; exit 2;;
  esac
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  sleep 0.5
}

if [ "$PIN" = 1 ]; then
  LT=(nice -n "$NICE" taskset -c "$GEN_CPU" "$BIN/meshpunch-loadtest")
else
  LT=(nice -n "$NICE" "$BIN/meshpunch-loadtest")
  SERVER_CPU=0-$(($(nproc) - 1))
fi
date -u +"%Y-%m-%dT%H:%M:%SZ" >"$OUT/started"
uptime >"$OUT/load-before"
for server in $SERVERS; do
  for size in $SIZES; do
    start_server "$server"
    echo "== $server, $size bytes: fixed $RATE pps for $DURATION" >&2
    "${LT[@]}" "$MODE" --pattern "$PATTERN" --server "127.0.0.1:$PORT" "${AUTH[@]}" --clients "$CLIENTS" \
      --size "$size" --rate "$RATE" --duration "$DURATION" --server-pid "$SERVER_PID" --json \
      >"$OUT/$server-$size-fixed.json"
    echo "== $server, $size bytes: max rate with loss < 1 %" >&2
    "${LT[@]}" "$MODE" --pattern "$PATTERN" --server "127.0.0.1:$PORT" "${AUTH[@]}" --clients "$CLIENTS" \
      --size "$size" --rate 25000 --duration "$TRIAL" --find-max --server-pid "$SERVER_PID" --json \
      >"$OUT/$server-$size-max.json"
    stop_server
  done
done
echo "== generator alone (direct, no server)" >&2
for size in $SIZES; do
  "${LT[@]}" direct --pattern "$PATTERN" --clients "$CLIENTS" --size "$size" --rate 25000 --duration "$TRIAL" --find-max --json \
    >"$OUT/direct-$size-max.json"
done
uptime >"$OUT/load-after"
"$(dirname "$0")/summarize.sh" "$OUT"
