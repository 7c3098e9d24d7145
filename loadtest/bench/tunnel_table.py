#!/usr/bin/env python3
"""Medians of a tunnel run (loadtest/bench/tunnel.sh): reads OUT/tunnel_paths.json (natlab's
tunnel_paths scenario), writes OUT/summary.json and prints a markdown table: Mbit/s and CPU
seconds per GB per set-up and path, plain WireGuard vs meshpunch on the same path, and
meshpunch's relay vs direct. Standard library only."""
import json
import os
import statistics
import sys

PATHS = ["lan", "direct", "relay"]
SETUPS = ["meshpunch", "plain-wireguard"]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main(out):
    data = json.load(open(os.path.join(out, "tunnel_paths.json")))
    cells = []
    for setup in SETUPS:
        for path in PATHS:
            rs = [r["result"] for r in data["rows"] if r["setup"] == setup and r["path"] == path]
            if not rs:
                continue
            cells.append({
                "setup": setup,
                "path": path,
                "rounds": len(rs),
                "mbps": med([r["mbps"] for r in rs]),
                "mbps_all": [round(r["mbps"], 1) for r in rs],
                "tunnel_cpu_s_per_gb": med([r.get("tunnel_cpu_s_per_gb") for r in rs]),
                "relay_cpu_s_per_gb": med([r.get("relay_cpu_s_per_gb") for r in rs]),
                "retransmits": med([r.get("retransmits") for r in rs]),
            })

    def cell(setup, path):
        return next((c for c in cells if c["setup"] == setup and c["path"] == path), None)

    ratios = {}
    for path in ("lan", "direct"):
        m, p = cell("meshpunch", path), cell("plain-wireguard", path)
        if m and p and m["mbps"] and p["mbps"]:
            ratios[f"meshpunch_vs_plain_{path}"] = m["mbps"] / p["mbps"]
    d, r = cell("meshpunch", "direct"), cell("meshpunch", "relay")
    if d and r and d["mbps"] and r["mbps"]:
        ratios["meshpunch_relay_vs_direct"] = r["mbps"] / d["mbps"]
    meta = {k: v for k, v in data.items() if k != "rows"}
    summary = {"meta": meta, "cells": cells, "ratios": ratios}
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"iperf3 TCP, {meta.get('secs')} s × {meta.get('rounds')} interleaved rounds, medians "
          f"(client {meta.get('client')}, relay {meta.get('relay')}, load {meta.get('load')})")
    print()
    print("| set-up | path | Mbit/s (median) | per round | tunnel CPU s/GB | relay CPU s/GB | TCP retransmits |")
    print("|---|---|---:|---|---:|---:|---:|")
    for c in cells:
        print(f"| {c['setup']} | {c['path']} | {f(c['mbps'], ',.1f')} | {' / '.join(str(x) for x in c['mbps_all'])} | "
              f"{f(c['tunnel_cpu_s_per_gb'], '.2f')} | {f(c['relay_cpu_s_per_gb'], '.2f')} | {f(c['retransmits'], '.0f')} |")
    print()
    for k, v in ratios.items():
        print(f"- {k.replace('_', ' ')}: {v:.2f}×")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest")
