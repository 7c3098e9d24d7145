#!/usr/bin/env bash
# TCP throughput (iperf3) through the tunnel on a LAN path, three ways side by side in one run,
# interleaved rounds:
#   tun    meshpunch up --tun (built-in WireGuard, packets to the path manager in memory)
#   proxy  boringtun-cli + meshpunch in proxy mode (WireGuard -> 127.0.0.1 proxy port -> meshpunch)
#   plain  boringtun-cli alone, endpoints pointing at each other (no meshpunch)
# Two network namespaces joined by a veth pair (no NAT, no rendezvous: static `Candidate`s).
# CPU per GB = user+system CPU seconds of the tunnel processes on both sides (meshpunch and/or
# boringtun-cli; not iperf3) divided by the GB iperf3 received.
# Needs root, iperf3, wg, boringtun-cli and a release build: cargo build --release -p meshpunch
set -euo pipefail
cd "$(dirname "$0")/../.."
MP=$(realpath "${MESHPUNCH:-target/release/meshpunch}")
BT=${BORINGTUN:-$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}   # boringtun-cli threads (the meshpunch daemon runs 2 tokio workers)
OUT=$(realpath -m "${OUT:-target/tun-bench}")
mkdir -p "$OUT"
P=mptb$(( $$ % 10000 ))
A=$P-a
B=$P-b
PIDS=()
HZ=$(getconf CLK_TCK)

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -f /var/run/wireguard/${P}w?.sock
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip link add "$P-va" type veth peer name "$P-vb"
ip link set "$P-va" netns "$A"
ip link set "$P-vb" netns "$B"
ip -n "$A" addr add 10.201.0.1/24 dev "$P-va"
ip -n "$B" addr add 10.201.0.2/24 dev "$P-vb"
for n in "$A" "$B"; do ip -n "$n" link set lo up; done
ip -n "$A" link set "$P-va" up
ip -n "$B" link set "$P-vb" up

KA=$("$MP" keygen); KB=$("$MP" keygen)
PA=$(echo "$KA" | "$MP" pubkey); PB=$(echo "$KB" | "$MP" pubkey)

cpu_of() { # CPU seconds (user+system) of the given pids
  local t=0
  for p in "$@"; do
    read -r -a f < "/proc/$p/stat"
    t=$(( t + f[13] + f[14] ))
  done
  echo "scale=3; $t / $HZ" | bc
}

# meshpunch config for side $1 (a|b): mode $2 (tun|proxy)
mpconf() {
  local me=$1 mode=$2 key peerkey ip peerip tunip peertun
  if [ "$me" = a ]; then key=$KA; peerkey=$PB; peerip=10.201.0.2; tunip=10.9.0.1; peertun=10.9.0.2
  else key=$KB; peerkey=$PA; peerip=10.201.0.1; tunip=10.9.0.2; peertun=10.9.0.1; fi
  {
    echo "[Interface]"
    echo "PrivateKey = $key"
    echo "ListenPort = 41641"
    echo "ControlSocket = $OUT/$me.sock"
    echo "BindingLifetime = 60"
    echo "BindingLifetimeProbe = off"
    if [ "$mode" = tun ]; then echo "Address = $tunip/24"; else echo "WireGuardEndpoint = 127.0.0.1:51820"; fi
    echo "[Peer]"
    echo "PublicKey = $peerkey"
    echo "Name = peer"
    echo "Candidate = $peerip:41641"
    if [ "$mode" = tun ]; then echo "AllowedIPs = $peertun/32"; else echo "ProxyPort = 51900"; fi
  } > "$OUT/$me-$mode.conf"
  chmod 600 "$OUT/$me-$mode.conf"
}

start_mp() { # side mode; sets LAST
  local ns=$A; [ "$1" = b ] && ns=$B
  local extra=(); [ "$2" = tun ] && extra=(--tun "${P}t")
  rm -f "$OUT/$1.sock"
  ip netns exec "$ns" "$MP" up --config "$OUT/$1-$2.conf" "${extra[@]}" > "$OUT/mp-$1-$2.log" 2>&1 &
  LAST=$!
  PIDS+=($LAST)
}

start_bt() { # side; sets LAST; tunnel address 10.8.0.1/2
  local ns=$A ip=10.8.0.1 key=$KA; [ "$1" = b ] && { ns=$B; ip=10.8.0.2; key=$KB; }
  local ifn=${P}w$1
  rm -f "/var/run/wireguard/$ifn.sock"
  ip netns exec "$ns" "$BT" --foreground --disable-drop-privileges --threads "$THREADS" "$ifn" > "$OUT/bt-$1.log" 2>&1 &
  LAST=$!
  PIDS+=($LAST)
  for _ in $(seq 1 100); do [ -S "/var/run/wireguard/$ifn.sock" ] && break; sleep 0.05; done
  echo "$key" > "$OUT/$1.key"
  ip netns exec "$ns" wg set "$ifn" private-key "$OUT/$1.key" listen-port 51820
  ip -n "$ns" addr add $ip/24 dev "$ifn"
  ip -n "$ns" link set "$ifn" up
}

wait_path() { # side
  for _ in $(seq 1 200); do
    if "$MP" status --json --control-socket "$OUT/$1.sock" 2>/dev/null | grep -Eq '"path": *"(lan|direct)"'; then return 0; fi
    sleep 0.1
  done
  echo "no direct path on $1" >&2; return 1
}

measure() { # mode dst pids...
  local mode=$1 dst=$2; shift 2
  ip netns exec "$B" iperf3 -s -1 -B "$dst" > "$OUT/iperf-s.log" 2>&1 &
  local spid=$!
  sleep 0.5
  # Warm-up (handshake), not measured.
  ip netns exec "$A" ping -c 2 -W 5 "$dst" > /dev/null || true
  local c0; c0=$(cpu_of "$@")
  ip netns exec "$A" iperf3 -c "$dst" -t "$SECS" -J > "$OUT/iperf-$mode-$ROUND.json"
  local c1; c1=$(cpu_of "$@")
  wait $spid 2>/dev/null || true
  local bytes bps
  bytes=$(grep -A8 '"sum_received"' "$OUT/iperf-$mode-$ROUND.json" | grep '"bytes"' | head -1 | tr -dc 0-9)
  bps=$(grep -A8 '"sum_received"' "$OUT/iperf-$mode-$ROUND.json" | grep '"bits_per_second"' | head -1 | sed 's/.*: *//; s/,//')
  local cpu; cpu=$(echo "$c1 - $c0" | bc)
  printf "%-6s round %d  %8.1f Mbit/s  %6.2f CPU s  %6.2f CPU s/GB\n" "$mode" "$ROUND" \
    "$(echo "$bps / 1000000" | bc -l)" "$cpu" "$(echo "$cpu / ($bytes / 1000000000)" | bc -l)" | tee -a "$OUT/results.txt"
}

stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  sleep 0.3
}

mpconf a tun; mpconf b tun; mpconf a proxy; mpconf b proxy
: > "$OUT/results.txt"
uptime | tee -a "$OUT/results.txt"
for ROUND in $(seq 1 "$ROUNDS"); do
  # tun
  start_mp a tun; pa=$LAST; start_mp b tun; pb=$LAST
  wait_path a; wait_path b
  measure tun 10.9.0.2 "$pa" "$pb"
  stop_all
  # proxy: boringtun-cli -> 127.0.0.1:51900 -> meshpunch -> LAN -> meshpunch -> 127.0.0.1:51820
  start_bt a; ba=$LAST; start_bt b; bb=$LAST
  start_mp a proxy; pa=$LAST; start_mp b proxy; pb=$LAST
  ip netns exec "$A" wg set "${P}wa" peer "$PB" allowed-ips 10.8.0.2/32 endpoint 127.0.0.1:51900
  ip netns exec "$B" wg set "${P}wb" peer "$PA" allowed-ips 10.8.0.1/32 endpoint 127.0.0.1:51900
  wait_path a; wait_path b
  measure proxy 10.8.0.2 "$ba" "$bb" "$pa" "$pb"
  stop_all
  # plain boringtun-cli
  start_bt a; ba=$LAST; start_bt b; bb=$LAST
  ip netns exec "$A" wg set "${P}wa" peer "$PB" allowed-ips 10.8.0.2/32 endpoint 10.201.0.2:51820
  ip netns exec "$B" wg set "${P}wb" peer "$PA" allowed-ips 10.8.0.1/32 endpoint 10.201.0.1:51820
  measure plain 10.8.0.2 "$ba" "$bb"
  stop_all
done
uptime | tee -a "$OUT/results.txt"
