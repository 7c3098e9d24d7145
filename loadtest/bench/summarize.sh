#!/usr/bin/env bash
# Prints the markdown tables of BENCHMARKS.md from the JSON files bench/relay.sh wrote.
set -euo pipefail
OUT=${1:-target/bench-results}
cpu='\(if .server_cpu_percent then (.server_cpu_percent|floor) else "-" end) | \(if .server_cpu_us_per_packet then (.server_cpu_us_per_packet*100|floor/100) else "-" end)'
echo "| server | size B | offered pps | delivered pps | Mbit/s | loss % | p50 µs | p99 µs | server CPU % | server CPU µs/pkt |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for f in "$OUT"/*-fixed.json; do
  name=$(basename "$f" -fixed.json); server=${name%-*}
  jq -r --arg s "$server" "\"| \\(\$s) | \\(.size) | \\(.rate) | \\(.pps|floor) | \\(.mbps*10|floor/10) | \\(.loss*100000|floor/1000) | \\(.p50_us) | \\(.p99_us) | $cpu |\"" "$f"
done
echo
echo "| server | size B | max pps (loss < 1 %) | Mbit/s | loss % | p50 µs | p99 µs | server CPU % | server CPU µs/pkt | trials |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for f in "$OUT"/*-max.json; do
  name=$(basename "$f" -max.json); server=${name%-*}
  jq -r --arg s "$server" "\"| \\(\$s) | \\(.size) | \\(if .found then (.pps|floor) else \"none passed\" end) | \\(.mbps*10|floor/10) | \\(.loss*100000|floor/1000) | \\(.p50_us) | \\(.p99_us) | $cpu | \\(.trials|length) |\"" "$f"
done
