#!/usr/bin/env bash
# Rendezvous memory vs connected clients, the input of bench/plot.py's rendezvous-rss figure.
#
# For each client count a fresh release meshpunch-rendezvous (--dev, loopback, in-memory
# registry) gets that many lean QUIC clients (meshpunch-loadtest rendezvous, spread over
# 127.0.1.x, a few offers so every connection has done real work); the JSON report (server RSS
# before/after, per client) lands in $OUT/clients-N.json.
#
# Knobs: COUNTS ["1000 5000 10000 20000 50000"]  OFFERS [200]  NICE [-19]
#        OUT [bench/results/rendezvous-rss]  BUILD [1]
set -euo pipefail
cd "$(dirname "$0")/../.."
COUNTS=${COUNTS:-1000 5000 10000 20000 50000}
OFFERS=${OFFERS:-200}
NICE=${NICE:--19}
OUT=${OUT:-bench/results/rendezvous-rss}
BUILD=${BUILD:-1}
export RUST_BACKTRACE=0
if [ "$BUILD" = 1 ]; then cargo build --release -q -p meshpunch-loadtest -p meshpunch-rendezvous; fi
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$OUT"
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
for n in $COUNTS; do
  rm -rf "$TMP/data"; mkdir -p "$TMP/data"
  nice -n "$NICE" "$BIN/meshpunch-rendezvous" --dev --data-dir "$TMP/data" --listen 127.0.0.1:0 --no-stun --no-admin \
    >"$TMP/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do [ -s "$TMP/data/connect" ] && break; sleep 0.1; done
  echo "== rendezvous: $n clients" >&2
  nice -n "$NICE" "$BIN/meshpunch-loadtest" rendezvous --connect "@$TMP/data/connect" --clients "$n" \
    --offers "$OFFERS" --server-pid "$SERVER_PID" --json >"$OUT/clients-$n.json"
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
done
