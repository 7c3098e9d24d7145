#!/usr/bin/env bash
# Flame graph of meshpunch-relay's hot path under the realistic load (issue 16: "what limits
# it"). The relay runs with one worker pinned to CPU $SERVER_CPU, the generator on
# CPU $GEN_CPU offers $RATE datagrams/s (realistic pattern: 64 clients × 4 channels,
# WireGuard size mix) for $SECS s, clients on $TRANSPORT (udp, tcp or tls); `perf record`
# samples the relay (user and kernel stacks, DWARF unwinding: the release profile keeps line
# tables, no frame pointers) for $PERF_SECS s in the middle. Stacks are folded and drawn with
# inferno (https://github.com/jonhoo/inferno, the Rust port of Brendan Gregg's FlameGraph
# scripts; `cargo install inferno`).
#
#   loadtest/bench/flame.sh                  # → docs/bench/relay-flame.svg,
#                                            #   bench/results/flame-<UTC time>/, table printed
#   TRANSPORT=tls loadtest/bench/flame.sh    # → docs/bench/relay-flame-tls.svg
#
# Knobs [defaults]: TRANSPORT [udp] RATE [30000] SECS [8] PERF_SECS [4] FREQ [499]
#   SERVER_CPU [1] GEN_CPU [0] SIZE [wg-mix] BUILD [1] OUT [bench/results/flame-<UTC time>-<transport>]
#   SVG [docs/bench/relay-flame.svg, relay-flame-<transport>.svg for tcp/tls]
#   BINS [target/release] (directory of meshpunch-relay and meshpunch-loadtest)
# Writes: OUT/meta.json, OUT/load.json (the generator's report of the run), OUT/relay.folded
# (folded stacks), OUT/summary.json (top symbols: self and inclusive share), SVG.
# Needs root (perf on another process), perf, inferno-collapse-perf and inferno-flamegraph.
set -euo pipefail
cd "$(dirname "$0")/../.."

TRANSPORT=${TRANSPORT:-udp}
RATE=${RATE:-30000}
SECS=${SECS:-8}
PERF_SECS=${PERF_SECS:-4}
FREQ=${FREQ:-499}
SERVER_CPU=${SERVER_CPU:-1}
GEN_CPU=${GEN_CPU:-0}
SIZE=${SIZE:-wg-mix}
BUILD=${BUILD:-1}
OUT=${OUT:-bench/results/flame-$(date -u +%Y%m%dT%H%M%SZ)-$TRANSPORT}
if [ "$TRANSPORT" = udp ]; then SVG=${SVG:-docs/bench/relay-flame.svg}; else SVG=${SVG:-docs/bench/relay-flame-$TRANSPORT.svg}; fi
SECRET=bench-secret
PORT=${PORT:-34990}
export RUST_BACKTRACE=0

for c in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$c" >/dev/null || { echo "flame.sh needs $c on PATH (inferno: cargo install inferno)" >&2; exit 1; }
done
case "$TRANSPORT" in udp|tcp|tls) ;; *) echo "TRANSPORT must be udp, tcp or tls" >&2; exit 1;; esac
if [ "$BUILD" = 1 ]; then
  cargo build --release -q -p meshpunch-loadtest -p meshpunch-relay
fi
REL=${BINS:-${CARGO_TARGET_DIR:-target}/release}
mkdir -p "$OUT" "$(dirname "$SVG")"
TMP=$(mktemp -d)
RELAY_PID=
cleanup() {
  if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

ADDR=127.0.0.1:$PORT
EXTRA_TOML=""
GEN_ARGS=()
case "$TRANSPORT" in
  tcp)
    ADDR=127.0.0.1:$((PORT + 1)); EXTRA_TOML="tcp_listen = \"$ADDR\""
    GEN_ARGS=(--transport tcp);;
  tls)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
      -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
    ADDR=127.0.0.1:$((PORT + 1))
    EXTRA_TOML=$(printf 'tls_listen = "%s"\ntls_cert = "%s"\ntls_key = "%s"' "$ADDR" "$TMP/cert.pem" "$TMP/key.pem")
    GEN_ARGS=(--transport tls --ca "$TMP/cert.pem");;
esac
cat >"$TMP/relay.toml" <<TOML
listen = "127.0.0.1:$PORT"
relay_ips = ["127.0.0.1"]
realm = "bench"
auth_secret = "$SECRET"
allow_loopback_peers = true
workers = 1
$EXTRA_TOML
TOML
taskset -c "$SERVER_CPU" "$REL/meshpunch-relay" --config "$TMP/relay.toml" >"$TMP/relay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 1 100); do grep -q "listening on" "$TMP/relay.log" && break; sleep 0.1; done
grep -q "listening on" "$TMP/relay.log" || { echo "relay did not start: $(cat "$TMP/relay.log")" >&2; exit 1; }

echo "== $TRANSPORT: $RATE/s realistic $SIZE for $SECS s, perf on the relay for $PERF_SECS s" >&2
taskset -c "$GEN_CPU" "$REL/meshpunch-loadtest" relay --server "$ADDR" --secret "$SECRET" "${GEN_ARGS[@]}" \
  --rate "$RATE" --size "$SIZE" --duration "${SECS}s" --server-pid "$RELAY_PID" --json >"$OUT/load.json" &
GEN_PID=$!
# Allocation setup first, then sample the middle of the sending time.
sleep $(( (SECS - PERF_SECS) / 2 + 2 ))
perf record -q -F "$FREQ" --call-graph dwarf,16384 -p "$RELAY_PID" -o "$TMP/perf.data" -- sleep "$PERF_SECS" 2>"$TMP/perf.log" || {
  cat "$TMP/perf.log" >&2; exit 1; }
wait "$GEN_PID"
perf script -i "$TMP/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/relay.folded"
inferno-flamegraph --title "meshpunch-relay, $TRANSPORT clients, realistic $SIZE at $RATE/s offered" \
  --hash --width 1200 <"$OUT/relay.folded" >"$SVG"
{
  echo "{"
  echo "  \"started\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"transport\": \"$TRANSPORT\", \"rate\": $RATE, \"size\": \"$SIZE\","
  echo "  \"secs\": $SECS, \"perf_secs\": $PERF_SECS, \"freq\": $FREQ, \"server_cpu\": \"$SERVER_CPU\", \"generator_cpu\": \"$GEN_CPU\","
  echo "  \"svg\": \"$SVG\", \"kernel\": \"$(uname -r)\", \"load_before\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
  echo "  \"git\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\""
  echo "}"
} >"$OUT/meta.json"
python3 "$(dirname "$0")/flame_top.py" "$OUT"
echo "wrote $SVG and $OUT/" >&2
