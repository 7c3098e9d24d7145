#!/usr/bin/env python3
"""Medians of a capped A/B run (loadtest/bench/capped.sh): reads OUT/r<round>-<side>-<pattern>-<size>.json,
writes OUT/summary.json and prints a markdown table. Standard library only."""
import glob
import json
import os
import re
import statistics
import sys


def main(out):
    meta = json.load(open(os.path.join(out, "meta.json")))
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "r*-*.json"))):
        m = re.match(r"r(\d+)-(.+)-(realistic|bulk)-([^.]+)\.json$", os.path.basename(path))
        if not m:
            continue
        try:
            r = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        _, side, pattern, size = m.groups()
        runs.setdefault((pattern, size, side), []).append(r)

    def med(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None and r.get("found")]
        return statistics.median(vals) if vals else None

    cases = []
    for (pattern, size, side), rs in sorted(runs.items()):
        cases.append({
            "pattern": pattern,
            "size": size,
            "side": side,
            "rounds": len(rs),
            "found": sum(1 for r in rs if r.get("found")),
            "pps": med(rs, "pps"),
            "pps_all": [round(r["pps"]) if r.get("found") else None for r in rs],
            "server_cpu_percent": med(rs, "server_cpu_percent"),
            "server_cpu_us_per_packet": med(rs, "server_cpu_us_per_packet"),
            "mean_size": med(rs, "size"),
            "mbps": med(rs, "mbps"),
            "loss": med(rs, "loss"),
            "duplicates": med(rs, "duplicates"),
            "reordered": med(rs, "reordered"),
            "p99_us": med(rs, "p99_us"),
            "generator_limited_runs": sum(1 for r in rs if r.get("generator_limited")),
        })
    # Every side against the base (two sides: A against B, as before).
    base = meta.get("base", meta["b"])
    ratios = []
    for c in cases:
        if c["side"] == base:
            continue
        o = next((x for x in cases if x["side"] == base and x["pattern"] == c["pattern"] and x["size"] == c["size"]), None)
        if not o:
            continue
        ratios.append({
            "side": c["side"],
            "base": base,
            "pattern": c["pattern"],
            "size": c["size"],
            "pps_ratio": c["pps"] / o["pps"] if c["pps"] and o["pps"] else None,
            "cpu_per_packet_ratio": o["server_cpu_us_per_packet"] / c["server_cpu_us_per_packet"]
            if c["server_cpu_us_per_packet"] and o["server_cpu_us_per_packet"] else None,
        })
    summary = {"meta": meta, "cases": cases, "ratios": ratios}
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"CPU quota {meta['quota_us']}/{meta['period_us']} µs, {meta['rounds']} interleaved rounds, medians "
          f"(socket buffers {meta['socket_buffer']} B; {meta['cgroup']})")
    print()
    print("| pattern | size | server | max pps (2 passing trials, loss < 1 %) | per round | server CPU µs/pkt | loss % | dup | reord | p99 µs | generator-limited runs |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        print(f"| {c['pattern']} | {c['size']} | {c['side']} | {f(c['pps'], ',.0f')} | "
              f"{' / '.join('-' if p is None else f'{p:,}' for p in c['pps_all'])} | "
              f"{f(c['server_cpu_us_per_packet'], '.2f')} | {f(c['loss'] * 100 if c['loss'] is not None else None, '.3f')} | "
              f"{f(c['duplicates'], '.0f')} | {f(c['reordered'], '.0f')} | {f(c['p99_us'], '.0f')} | "
              f"{c['generator_limited_runs']}/{c['rounds']} |")
    print()
    print("| pattern | size | side / base | pps ratio | packets per CPU ratio |")
    print("|---|---|---|---:|---:|")
    for r in ratios:
        print(f"| {r['pattern']} | {r['size']} | {r['side']} / {r['base']} | {f(r['pps_ratio'], '.2f')}× | "
              f"{f(r['cpu_per_packet_ratio'], '.2f')}× |")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest")
