#!/usr/bin/env python3
"""Top symbols of a folded-stack profile (loadtest/bench/flame.sh): reads OUT/relay.folded
(`frame;frame;...;leaf weight` lines, inferno-collapse-perf), writes OUT/summary.json and prints
markdown tables: self share (where the CPU is spent) and inclusive share (what it is spent
under). Standard library only."""
import json
import os
import re
import sys

TOP = 20
WRAPPER = re.compile(r"^(<?(std|core|alloc)::|<core::|<alloc::|__rust|_start$|main$|__libc_start)")


def short(frame):
    # Drop Rust hashes and long generic paths: `a::b::C<T>::f::h0123…` → `a::b::C<T>::f`.
    frame = re.sub(r"::h[0-9a-f]{16}$", "", frame)
    return frame if len(frame) <= 110 else frame[:107] + "…"


def main(out):
    selfc, incl, total = {}, {}, 0
    with open(os.path.join(out, "relay.folded")) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = [short(x) for x in stack.split(";")]
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
            # Inclusive: skip the thread name (first frame) and the standard library's
            # wrappers every stack passes through.
            for fr in set(frames[1:]):
                if not WRAPPER.match(fr):
                    incl[fr] = incl.get(fr, 0) + n
    if total == 0:
        print(f"{out}/relay.folded has no samples", file=sys.stderr)
        sys.exit(1)

    def top(d):
        return [{"symbol": k, "weight": v, "percent": round(100.0 * v / total, 2)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:TOP]]

    meta = {}
    try:
        meta = json.load(open(os.path.join(out, "meta.json")))
    except (OSError, ValueError):
        pass
    load = {}
    try:
        load = json.load(open(os.path.join(out, "load.json")))
    except (OSError, ValueError):
        pass
    summary = {
        "meta": meta,
        "weight": total,
        "delivered_pps": load.get("pps"),
        "loss": load.get("loss"),
        "server_cpu_percent": load.get("server_cpu_percent"),
        "server_cpu_us_per_packet": load.get("server_cpu_us_per_packet"),
        "self": top(selfc),
        "inclusive": top(incl),
    }
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
    cpu = summary["server_cpu_percent"]
    print(f"{total} units of perf weight (sample periods); delivered {summary['delivered_pps'] or 0:,.0f} pps, loss "
          f"{(summary['loss'] or 0) * 100:.3f} %, relay CPU {cpu if cpu is None else round(cpu)} %, "
          f"{summary['server_cpu_us_per_packet'] or 0:.2f} µs/pkt")
    for name in ("self", "inclusive"):
        print()
        print(f"| {name} % | symbol |")
        print("|---:|---|")
        for r in summary[name]:
            print(f"| {r['percent']:.1f} | `{r['symbol']}` |")


if __name__ == "__main__":
    main(sys.argv[1])
