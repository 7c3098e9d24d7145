#!/usr/bin/env bash
# meshpunch-relay on ONE core with its clients on UDP, TURN over TCP and TURN over TLS
# (issue 17): capped.sh with three sides, the server's cgroup at cpu.max 10000/10000 (one full
# core, pinned to CPU $SERVER_CPU), the generator uncapped on CPU $GEN_CPU, --find-max at
# 100 B and 1200 B in the realistic pattern (64 clients × 4 channels: 64 TCP/TLS
# connections), interleaved rounds (the order rotates), medians. Peers are on UDP for every
# side: what differs is the client side of the relay (UDP datagrams vs TCP reads vs TLS
# decryption and reframing).
#
#   loadtest/bench/transport.sh            # → bench/results/transport-<UTC time>/, table printed
#
# Any capped.sh knob applies (ROUNDS [3], TRIAL [2s], CASES, LOAD_EXTRA, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
export A=${A:-relay-udp} B=${B:-relay-tcp}
export SIDES=${SIDES:-relay-udp relay-tcp relay-tls}
export BASE=${BASE:-relay-udp}
export QUOTA_US=${QUOTA_US:-10000} PERIOD_US=${PERIOD_US:-10000}
export CASES=${CASES:-realistic:100 realistic:1200}
export OUT=${OUT:-bench/results/transport-$(date -u +%Y%m%dT%H%M%SZ)}
exec "$(dirname "$0")/capped.sh"
