#!/usr/bin/env bash
# Tunnel throughput per path kind (issue 16): iperf3 TCP through WireGuard on the lan, direct
# and relay paths of the NAT lab, meshpunch --tun vs plain WireGuard (boringtun-cli, static
# endpoints) in one run, rounds interleaved — natlab's `tunnel_paths` scenario
# (natlab/tests/tunnel_paths.rs) with release binaries, then the medians.
#
#   loadtest/bench/tunnel.sh       # → bench/results/tunnel-<UTC time>/tunnel_paths.json,
#                                  #   summary.json, table printed
#
# Knobs [defaults]: SECS [10] ROUNDS [3] OUT [bench/results/tunnel-<UTC time>]
#   NATLAB_RELAY [meshpunch] (coturn: coturn as the relay) BUILD [1]
# Needs root, iperf3, wg, boringtun-cli (cargo install boringtun-cli), ip, nft.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-bench/results/tunnel-$(date -u +%Y%m%dT%H%M%SZ)}
BUILD=${BUILD:-1}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
if [ "$BUILD" = 1 ]; then
  # The lab runs the binaries next to the test executable: release ones for a release test.
  cargo build --release -q -p meshpunch -p meshpunch-rendezvous -p meshpunch-relay --bins
fi
# CI=true: a missing tool fails instead of skipping (the measurement must not pass empty).
CI=true TUNNEL_SECS=$SECS TUNNEL_ROUNDS=$ROUNDS NATLAB_RESULTS_DIR=$OUT \
  cargo test --release -q -p natlab --test tunnel_paths -- --nocapture --test-threads 1 >&2
python3 "$(dirname "$0")/tunnel_table.py" "$OUT"
