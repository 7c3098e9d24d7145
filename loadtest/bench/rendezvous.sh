#!/usr/bin/env bash
# Reproduces the rendezvous and time-to-direct tables of BENCHMARKS.md.
#
# Starts a release meshpunch-rendezvous (--dev, loopback, in-memory registry), registers
# $CLIENTS lean QUIC clients (spread over 127.0.1.x source addresses, 32 per endpoint), each
# watching its partner, exchanges $OFFERS offers, reads the server's RSS per connected client,
# then measures time to direct over $PAIRS pairs of real meshpunch::rendezvous clients on a
# fresh server. Server and generator are not pinned: both share the 2 cores; both run at
# niceness $NICE [-19] so that other work on a shared machine disturbs the numbers less.
#
# Environment knobs: CLIENTS [50000]  OFFERS [2000]  OFFER_RATE [500]  PAIRS [100]
#                    OUT [target/bench-results]
set -euo pipefail
cd "$(dirname "$0")/../.."

CLIENTS=${CLIENTS:-50000}
OFFERS=${OFFERS:-2000}
OFFER_RATE=${OFFER_RATE:-500}
PAIRS=${PAIRS:-100}
OUT=${OUT:-target/bench-results}
NICE=${NICE:--19}
export RUST_BACKTRACE=0

cargo build --release -q -p meshpunch-loadtest -p meshpunch-rendezvous
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$OUT"
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

start_server() {
  rm -rf "$TMP/data"; mkdir -p "$TMP/data"
  nice -n "$NICE" "$BIN/meshpunch-rendezvous" --dev --data-dir "$TMP/data" --listen 127.0.0.1:0 --no-stun --no-admin \
    >"$TMP/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do [ -s "$TMP/data/connect" ] && return 0; sleep 0.1; done
  echo "rendezvous did not start: $(cat "$TMP/server.log")" >&2; exit 1
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }

uptime >"$OUT/rendezvous-load-before"
start_server
echo "== rendezvous: $CLIENTS clients, $OFFERS offers" >&2
nice -n "$NICE" "$BIN/meshpunch-loadtest" rendezvous --connect "@$TMP/data/connect" --clients "$CLIENTS" \
  --offers "$OFFERS" --offer-rate "$OFFER_RATE" --server-pid "$SERVER_PID" --json >"$OUT/rendezvous.json"
stop_server
start_server
echo "== punch: $PAIRS pairs" >&2
nice -n "$NICE" "$BIN/meshpunch-loadtest" punch --connect "@$TMP/data/connect" --pairs "$PAIRS" --json >"$OUT/punch.json"
stop_server
uptime >"$OUT/rendezvous-load-after"
jq -r '"| \(.clients) | \(.registered) | \(.failures) | \(.registrations_per_sec|floor) | \(.register_p50_us/1000|floor) / \(.register_p99_us/1000|floor) | \(.offers_ok)/\(.offers) | \(.offer_rtt_p50_us) / \(.offer_rtt_p99_us) / \(.offer_rtt_max_us) | \(.server_rss_before_kib) → \(.server_rss_after_kib) | \(.server_rss_per_client_bytes) |"' "$OUT/rendezvous.json"
jq -r '"| \(.pairs) | \(.direct) | \(.ttd_p50_us) / \(.ttd_p90_us) / \(.ttd_p99_us) / \(.ttd_max_us) | \(.offer_rtt_p50_us) / \(.offer_rtt_p99_us) | \(.start_wait_p50_us) | \(.probe_p50_us) / \(.probe_p99_us) |"' "$OUT/punch.json"
