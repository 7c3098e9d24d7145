#!/usr/bin/env bash
# Interleaved A/B of two meshpunch-relay builds (before/after), 3 rounds, fixed 50,000 pps and a
# maximum-rate search at 100 and 1200 B. BEFORE_RELAY / AFTER_RELAY name the two binaries; one
# generator binary for both, relay pinned to CPU 1, generator to CPU 0, nice -19, same config.
set -euo pipefail
cd "$(dirname "$0")/../.."
GEN=${GEN:-target/release/meshpunch-loadtest}
declare -A BIN=([before]=${BEFORE_RELAY:?path of the before binary} [after]=${AFTER_RELAY:-target/release/meshpunch-relay})
OUT=${OUT:-target/ab}; mkdir -p "$OUT"; PORT=34790; SECRET=bench-secret
cat > $OUT/relay.toml <<TOML
listen = "127.0.0.1:$PORT"
relay_ips = ["127.0.0.1"]
realm = "bench"
auth_secret = "$SECRET"
allow_loopback_peers = true
workers = 1
TOML
for round in 1 2 3; do
  for v in before after; do
    for size in 100 1200; do
      nice -n -19 taskset -c 1 ${BIN[$v]} --config $OUT/relay.toml > $OUT/server.log 2>&1 &
      pid=$!
      for _ in $(seq 1 100); do grep -q "listening on" $OUT/server.log && break; sleep 0.1; done
      nice -n -19 taskset -c 0 $GEN relay --pattern ${PATTERN:-bulk} --server 127.0.0.1:$PORT --secret $SECRET --clients 16 \
        --size $size --rate 50000 --duration 5s --server-pid $pid --json > $OUT/$v-$size-fixed-$round.json
      nice -n -19 taskset -c 0 $GEN relay --pattern ${PATTERN:-bulk} --server 127.0.0.1:$PORT --secret $SECRET --clients 16 \
        --size $size --rate 25000 --duration 2s --find-max --server-pid $pid --json > $OUT/$v-$size-max-$round.json
      kill $pid; wait $pid 2>/dev/null || true; sleep 0.5
    done
  done
done
uptime > $OUT/load-after
