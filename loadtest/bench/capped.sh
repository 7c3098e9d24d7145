#!/usr/bin/env bash
# Server-bound A/B comparison of two relays under a CPU quota, interleaved rounds, medians.
#
# The server under test runs in its own cgroup with a CPU quota on a short period (default
# 2500 µs every 10 ms = 25 % of one core; with a 100 ms period a capped server would sleep
# 75 ms at a time and the test would measure socket buffer size instead of CPU), pinned to
# CPU $SERVER_CPU; the load generator runs uncapped on CPU $GEN_CPU, so the server — not the
# generator — is the limit (each JSON says whether the generator was: `generator_limited`).
# Both servers get the same socket buffers on their listening socket, where client load
# queues: coturn 4.6 has no option for it and asks SO_RCVBUF/SO_SNDBUF = 2 MiB (strace), so
# meshpunch-relay gets `socket_buffer = $BUF` with BUF = 2 MiB by default, and
# net.core.{r,w}mem_max is raised to $BUF for the run if lower (restored on exit) so neither
# request is cut.
# The buffer sizes each server really got, listening and relayed sockets, are recorded from `ss`
# a few seconds into the run (sockets-*.txt, skmem rb/tb: the kernel doubles every request).
#
# Every round runs every case for both sides, alternating which side goes first (A B, then
# B A, ...), each on a freshly started server; each run is a --find-max search (a rate passes
# with two passing trials in a row, loss < $MAX_LOSS %). Results: one JSON per run in $OUT and
# $OUT/summary.json with medians per side and case (loadtest/bench/median.py), printed as a
# markdown table.
#
# Sides: A and B name what to compare: `coturn`, `bare` (the bare forwarder) or any other
# label for a meshpunch-relay binary (path in ${A_BIN} / ${B_BIN}, default
# target/release/meshpunch-relay). A label ending in `-tcp` or `-tls` is meshpunch-relay with
# the clients on TURN over TCP / TLS (`--transport`; a self-signed certificate made with
# openssl for TLS); peers stay on UDP. SIDES lists more than two sides (default "A B"); each
# round rotates which goes first; ratios are every side against BASE (default B). Examples:
#   loadtest/bench/capped.sh                                 # meshpunch vs coturn
#   A=before A_BIN=/tmp/before/meshpunch-relay B=after loadtest/bench/capped.sh
#   loadtest/bench/transport.sh                              # udp vs tcp vs tls on one core
#
# Knobs [defaults]: A [meshpunch] B [coturn] ROUNDS [3] QUOTA_US [2500] PERIOD_US [10000]
#   SERVER_CPU [1] GEN_CPU [0] BUF [2097152] TRIAL [2s] START_RATE [20000] MAX_LOSS [1]
#   CASES ["realistic:wg-mix realistic:100 realistic:1200 bulk:100 bulk:1200"] (pattern:size)
#   RELAY_EXTRA [""] (TOML lines appended to meshpunch-relay's config, e.g. "gso = false")
#   LOAD_EXTRA [""] (more generator options, e.g. "--clients 1024 --peers-per-client 1")
#   NICE [-19] OUT [bench/results/capped-<UTC time>] BUILD [1] SIDES ["A B"] BASE [B]
#   BINS [target/release] (directory of meshpunch-relay and meshpunch-loadtest)
# Needs root (cgroup, sysctl, nice) and coturn's turnserver on PATH for the coturn side.
set -euo pipefail
cd "$(dirname "$0")/../.."

A=${A:-meshpunch}
B=${B:-coturn}
SIDES=${SIDES:-$A $B}
BASE=${BASE:-$B}
ROUNDS=${ROUNDS:-3}
QUOTA_US=${QUOTA_US:-2500}
PERIOD_US=${PERIOD_US:-10000}
SERVER_CPU=${SERVER_CPU:-1}
GEN_CPU=${GEN_CPU:-0}
BUF=${BUF:-2097152}
TRIAL=${TRIAL:-2s}
START_RATE=${START_RATE:-20000}
MAX_LOSS=${MAX_LOSS:-1}
CASES=${CASES:-realistic:wg-mix realistic:100 realistic:1200 bulk:100 bulk:1200}
RELAY_EXTRA=${RELAY_EXTRA:-}
LOAD_EXTRA=${LOAD_EXTRA:-}
NICE=${NICE:--19}
OUT=${OUT:-bench/results/capped-$(date -u +%Y%m%dT%H%M%SZ)}
BUILD=${BUILD:-1}
SECRET=bench-secret
PORT=${PORT:-34890}
export RUST_BACKTRACE=0

if [ "$BUILD" = 1 ]; then
  cargo build --release -q -p meshpunch-loadtest -p meshpunch-relay
fi
REL=${BINS:-${CARGO_TARGET_DIR:-target}/release}
GEN=${GEN:-$REL/meshpunch-loadtest}
mkdir -p "$OUT"
TMP=$(mktemp -d)
SERVER_PID=
CG=
GEN_CG=
declare -A SAVED=()

cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  for k in "${!SAVED[@]}"; do sysctl -q -w "$k=${SAVED[$k]}" >/dev/null || true; done
  for g in "$CG" "$GEN_CG"; do if [ -n "$g" ] && [ -d "$g" ]; then rmdir "$g" 2>/dev/null || true; fi; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- the cgroups: the server's with the CPU quota (v2 cpu.max, else v1 cpu.cfs_*), the
# generator's without; both with the highest CPU weight, so that on a shared machine other work
# (compilers in other login sessions: the kernel's autogroups give every session equal weight
# whatever its nice level) does not take the CPU the server is allowed to use ---
if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
  grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu >/sys/fs/cgroup/cgroup.subtree_control
  CG=/sys/fs/cgroup/meshpunch-bench-$$
  GEN_CG=/sys/fs/cgroup/meshpunch-bench-gen-$$
  mkdir -p "$CG" "$GEN_CG"
  echo "$QUOTA_US $PERIOD_US" >"$CG/cpu.max"
  echo 10000 >"$CG/cpu.weight"; echo 10000 >"$GEN_CG/cpu.weight"
  CG_KIND="v2 cpu.max=$(cat "$CG/cpu.max") cpu.weight=10000"
elif [ -d /sys/fs/cgroup/cpu ]; then
  CG=/sys/fs/cgroup/cpu/meshpunch-bench-$$
  GEN_CG=/sys/fs/cgroup/cpu/meshpunch-bench-gen-$$
  mkdir -p "$CG" "$GEN_CG"
  echo "$PERIOD_US" >"$CG/cpu.cfs_period_us"
  echo "$QUOTA_US" >"$CG/cpu.cfs_quota_us"
  echo 262144 >"$CG/cpu.shares"; echo 262144 >"$GEN_CG/cpu.shares"
  CG_KIND="v1 cfs_quota_us=$(cat "$CG/cpu.cfs_quota_us") cfs_period_us=$(cat "$CG/cpu.cfs_period_us") shares=262144"
else
  echo "no cgroup CPU controller (neither /sys/fs/cgroup/cgroup.controllers with cpu nor /sys/fs/cgroup/cpu)" >&2
  exit 1
fi

# --- equal socket buffers for both servers ---
# Both ask for BUF (meshpunch-relay: socket_buffer; coturn 4.6 asks 2 MiB for its listening
# socket, compiled in), the kernel caps the request at *_max and doubles it (`ss` shows rb/tb =
# 2 × BUF for both).
# Only ever raised (other work on the machine may rely on a higher cap).
for k in net.core.rmem_max net.core.wmem_max; do
  SAVED[$k]=$(sysctl -n "$k")
  if [ "${SAVED[$k]}" -lt "$BUF" ]; then sysctl -q -w "$k=$BUF" >/dev/null; fi
done

wait_line() { # file pattern
  for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "server did not start: $(cat "$1")" >&2; return 1
}

# Runs "$@" inside the capped cgroup, pinned, at $NICE.
# (exec: the background job's PID is the server's own, for --server-pid and kill)
in_cgroup() {
  exec sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG" nice -n "$NICE" taskset -c "$SERVER_CPU" "$@"
}

# Runs the generator in its own (uncapped) cgroup, pinned, at $NICE.
generator() {
  sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$GEN_CG" nice -n "$NICE" taskset -c "$GEN_CPU" "$GEN" "$@"
}

port_free() {
  ! ss -Huln "sport = :$PORT" | grep -q . && ! ss -Htln "sport = :$((PORT + 1))" | grep -q .
}

# For -tls sides: a self-signed certificate for 127.0.0.1 the generator trusts with --ca.
tls_cert() {
  [ -f "$TMP/cert.pem" ] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
}

start_server() { # side -> SERVER_PID MODE AUTH ADDR
  local side=$1 binvar stream_toml=""
  ADDR=127.0.0.1:$PORT
  for _ in $(seq 1 50); do port_free && break; sleep 0.1; done
  if ! port_free; then echo "UDP port $PORT is taken (another server still running?)" >&2; exit 1; fi
  case "$side" in
    coturn)
      in_cgroup turnserver -n --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 -p "$PORT" \
        --use-auth-secret --static-auth-secret "$SECRET" --realm bench --allow-loopback-peers \
        --no-cli --no-tls --no-dtls --no-software-attribute -m 1 \
        --db "$TMP/turndb" --pidfile "$TMP/turnserver.pid" --log-file stdout --simple-log \
        >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      sleep 1.5
      MODE=relay; AUTH=(--secret "$SECRET");;
    bare)
      in_cgroup "$GEN" forwarder --listen "127.0.0.1:$PORT" --threads 1 >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      wait_line "$TMP/server.log" "listening on"
      MODE=bare; AUTH=();;
    *)
      if [ "$side" = "$A" ]; then binvar=${A_BIN:-$REL/meshpunch-relay}; elif [ "$side" = "$B" ]; then binvar=${B_BIN:-$REL/meshpunch-relay}; else binvar=$REL/meshpunch-relay; fi
      AUTH=(--secret "$SECRET")
      case "$side" in
        *-tcp)
          ADDR=127.0.0.1:$((PORT + 1)); stream_toml="tcp_listen = \"$ADDR\""
          AUTH+=(--transport tcp);;
        *-tls)
          tls_cert
          ADDR=127.0.0.1:$((PORT + 1))
          stream_toml=$(printf 'tls_listen = "%s"\ntls_cert = "%s"\ntls_key = "%s"' "$ADDR" "$TMP/cert.pem" "$TMP/key.pem")
          AUTH+=(--transport tls --ca "$TMP/cert.pem");;
      esac
      cat >"$TMP/relay.toml" <<TOML
listen = "127.0.0.1:$PORT"
relay_ips = ["127.0.0.1"]
realm = "bench"
auth_secret = "$SECRET"
allow_loopback_peers = true
workers = 1
socket_buffer = $BUF
$stream_toml
$RELAY_EXTRA
TOML
      in_cgroup "$binvar" --config "$TMP/relay.toml" >"$TMP/server.log" 2>&1 &
      SERVER_PID=$!
      wait_line "$TMP/server.log" "listening on"
      MODE=relay;;
  esac
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  sleep 0.5
}

throttled() { # prints the cgroup's throttling counters
  if [ -f "$CG/cpu.stat" ]; then tr '\n' ' ' <"$CG/cpu.stat"; fi
}

{
  echo "{"
  echo "  \"started\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"a\": \"$A\", \"b\": \"$B\", \"sides\": \"$SIDES\", \"base\": \"$BASE\", \"rounds\": $ROUNDS,"
  echo "  \"cgroup\": \"$CG_KIND\", \"quota_us\": $QUOTA_US, \"period_us\": $PERIOD_US,"
  echo "  \"server_cpu\": \"$SERVER_CPU\", \"generator_cpu\": \"$GEN_CPU\", \"socket_buffer\": $BUF,"
  echo "  \"trial\": \"$TRIAL\", \"start_rate\": $START_RATE, \"max_loss_percent\": $MAX_LOSS,"
  echo "  \"relay_extra\": \"$RELAY_EXTRA\", \"load_extra\": \"$LOAD_EXTRA\","
  echo "  \"kernel\": \"$(uname -r)\", \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\","
  echo "  \"load_before\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
  echo "  \"git\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)\""
  echo "}"
} >"$OUT/meta.json"

for round in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round (two sides: A B, B A, ...).
  read -ra sides <<<"$SIDES"
  n=${#sides[@]}; order=""
  for i in $(seq 0 $((n - 1))); do order="$order ${sides[$(((i + round - 1) % n))]}"; done
  for case in $CASES; do
    pattern=${case%%:*}; size=${case#*:}
    for side in $order; do
      start_server "$side"
      (sleep 3; ss -uampn 2>/dev/null | grep -A1 "pid=$SERVER_PID," >"$OUT/sockets-$side.txt" || true) &
      t0=$(throttled)
      echo "== round $round, $side, $pattern $size: max rate at $QUOTA_US/$PERIOD_US µs CPU" >&2
      generator "$MODE" --server "$ADDR" "${AUTH[@]}" \
        --pattern "$pattern" --size "$size" --rate "$START_RATE" --duration "$TRIAL" \
        --find-max --max-loss "$MAX_LOSS" --server-pid "$SERVER_PID" --json $LOAD_EXTRA \
        >"$OUT/r$round-$side-$pattern-$size.json"
      echo "{\"before\": \"$t0\", \"after\": \"$(throttled)\"}" >"$OUT/r$round-$side-$pattern-$size.cgroup.json"
      stop_server
    done
  done
done
cut -d' ' -f1-3 /proc/loadavg >"$OUT/load-after"
python3 "$(dirname "$0")/median.py" "$OUT"
