#!/usr/bin/python3
"""Regenerates every benchmark figure of BENCHMARKS.md from the committed JSON results.

    bench/plot.py [--results bench/results] [--out docs/bench] [--format svg|png]

Inputs (all under --results; a missing input skips its figure with a message):
  natlab/mesh_matrix.json     written by `cargo test -p natlab --test mesh_matrix`
                              (target/natlab-results/, copy it here to commit it)
  natlab/mesh_failover.json   written by `cargo test -p natlab --test mesh_failover`
  capped-*/summary.json       written by loadtest/bench/capped.sh (the newest meshpunch-vs-coturn
                              run without LOAD_EXTRA is plotted, next to the newest one with
                              LOAD_EXTRA=--bidirectional as "both ways"; A/B runs of two relay
                              builds and other variants are skipped)
  rendezvous-rss/*.json       `meshpunch-loadtest rendezvous --server-pid … --json` outputs at
                              several client counts (loadtest/bench/rendezvous_rss.sh)
  transport-*/summary.json    written by loadtest/bench/transport.sh (relay on one core, clients
                              on UDP / TCP / TLS; the newest run is plotted)
  tunnel-*/summary.json       written by loadtest/bench/tunnel.sh (iperf3 through WireGuard per
                              path kind, meshpunch vs plain WireGuard; the newest run)

Outputs (--out): nat-matrix, relay-vs-coturn, failover-timeline, rendezvous-rss, relay-transport,
tunnel-paths (.svg or .png). The relay flame graphs (docs/bench/relay-flame*.svg) come from
loadtest/bench/flame.sh, not from here.
Needs matplotlib: Debian's /usr/bin/python3 with `apt-get install python3-matplotlib` (the shebang
uses it). The test suite does not run this.
"""
import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# svg output without timestamps or random ids, so regenerating unchanged inputs changes nothing.
plt.rcParams["svg.hashsalt"] = "meshpunch"
plt.rcParams["svg.fonttype"] = "none"
plt.rcParams["font.size"] = 9

PATH_COLORS = {"direct": "#2a9d8f", "lan": "#8ab17d", "relay": "#e9c46a", "none": "#e76f51"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"  skip: {path}: {e}", file=sys.stderr)
        return None


def save(fig, out, name, fmt):
    path = os.path.join(out, f"{name}.{fmt}")
    meta = {"Date": None} if fmt == "svg" else {}
    fig.savefig(path, bbox_inches="tight", metadata=meta)
    plt.close(fig)
    print(f"  wrote {path}")


def nat_matrix(results, out, fmt):
    data = load(os.path.join(results, "natlab", "mesh_matrix.json"))
    if not data:
        return
    rows = [r["host"] for r in data["rows"]]
    cols = [c["host"] for c in data["cols"]]
    nat = {h["host"]: h["nat"] for h in data["rows"] + data["cols"]}
    cell = {(c["row"], c["col"]): c for c in data["cells"]}
    paths = ["direct", "lan", "relay", "none", "n/a"]
    colors = [PATH_COLORS[p] for p in paths[:4]] + ["#d9d9d9"]

    def kind(path):
        # "relay-tls" / "relay-tcp": a relay path reached over a stream (UDP blocked).
        if path.startswith("relay"):
            return paths.index("relay")
        return paths.index(path) if path in paths else paths.index("none")

    grid = [[kind(cell[(r, c)]["path"]) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.5 * len(cols) + 2, 0.75 * len(rows) + 1.5))
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=len(paths) - 1, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            x = cell[(r, c)]
            t = x.get("time_to_direct_s")
            label = x["path"] + ("" if t is None else f"\n{t:.2f} s")
            if x.get("birthday"):
                label += "\n(birthday)"
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{c}\n{nat[c]}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r} {nat[r]}" for r in rows])
    ax.set_xlabel("column host (NAT)")
    ax.set_ylabel("row host (NAT)")
    ax.set_title("NAT pair matrix: path each row host ends on, time from start to direct")
    labels = {"direct": "direct", "relay": "relay (UDP, or TLS: relay-tls)", "none": "none",
              "n/a": "pair not in the matrix"}
    ax.legend(handles=[Patch(color=colors[paths.index(p)], label=labels[p])
                       for p in ("direct", "relay", "none", "n/a")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save(fig, out, "nat-matrix", fmt)


def newest_capped(results, load_extra=""):
    best = None
    for path in sorted(glob.glob(os.path.join(results, "capped-*", "summary.json"))):
        s = load(path)
        if not s:
            continue
        sides = {s["meta"]["a"], s["meta"]["b"]}
        # The standard shape, or the variant with exactly these extra generator options.
        if "coturn" not in sides or s["meta"].get("load_extra", "") != load_extra:
            continue
        if best is None or s["meta"].get("started", "") >= best[1]["meta"].get("started", ""):
            best = (path, s)
    return best


def relay_vs_coturn(results, out, fmt):
    found = newest_capped(results)
    if not found:
        print("  skip: no capped-*/summary.json comparing with coturn", file=sys.stderr)
        return
    path, s = found
    meta = s["meta"]
    sides = [meta["a"], meta["b"]]
    cases = []
    for c in s["cases"]:
        key = (c["pattern"], c["size"])
        if key not in cases:
            cases.append(key)
    by = {(c["pattern"], c["size"], c["side"]): c for c in s["cases"]}
    ratios = list(s.get("ratios", []))
    sources = [os.path.relpath(path)]
    # The same comparison with traffic both ways (a WireGuard session's shape), if measured.
    both = newest_capped(results, "--bidirectional")
    if both and {both[1]["meta"]["a"], both[1]["meta"]["b"]} == set(sides):
        for c in both[1]["cases"]:
            key = ("both ways", c["size"])
            if key not in cases:
                cases.append(key)
            by[("both ways", c["size"], c["side"])] = c
        ratios += [dict(r, pattern="both ways") for r in both[1].get("ratios", [])]
        sources.append(os.path.relpath(both[0]))
    order = {"realistic": 0, "both ways": 1, "bulk": 2}
    cases.sort(key=lambda k: (order.get(k[0], 3), k[1] != "wg-mix", int(k[1]) if k[1].isdigit() else 0))
    colors = {sides[0]: "#264653", sides[1]: "#e76f51"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.2))
    width = 0.38
    xs = range(len(cases))
    for k, side in enumerate(sides):
        pps = [(by.get((p, z, side)) or {}).get("pps") or 0 for p, z in cases]
        cpu = [(by.get((p, z, side)) or {}).get("server_cpu_us_per_packet") or 0 for p, z in cases]
        off = (k - 0.5) * width
        ax1.bar([x + off for x in xs], [v / 1000 for v in pps], width, label=side, color=colors[side])
        ax2.bar([x + off for x in xs], cpu, width, label=side, color=colors[side])
    labels = [f"{'both' + chr(10) + 'ways' if p == 'both ways' else p}\n{z}{'' if z == 'wg-mix' else ' B'}"
              for p, z in cases]
    for r in ratios:
        if r.get("pps_ratio") is None:
            continue
        i = cases.index((r["pattern"], r["size"])) if (r["pattern"], r["size"]) in cases else None
        if i is not None:
            labels[i] += f"\n{r['pps_ratio']:.2f}×"
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), labels)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(frameon=False)
        ax.grid(axis="y", alpha=0.3)
    ax1.set_ylabel("max delivered kpps (loss < 1 %, two passing trials)")
    ax2.set_ylabel("server CPU µs per delivered packet")
    quota = 100 * meta["quota_us"] / meta["period_us"]
    fig.suptitle(f"Relay under a {quota:.0f} % CPU quota ({meta['quota_us']}/{meta['period_us']} µs), "
                 f"median of {meta['rounds']} interleaved rounds — {meta.get('started', '')}")
    fig.text(0.5, -0.12, f"source: {'; '.join(sources)}; load before: {meta.get('load_before', '?')}",
             ha="center", fontsize=7)
    save(fig, out, "relay-vs-coturn", fmt)


def failover_timeline(results, out, fmt):
    data = load(os.path.join(results, "natlab", "mesh_failover.json"))
    if not data:
        return
    arr = data["arrivals"]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    t = [a["t_s"] for a in arr]
    d = [a["delay_ms"] for a in arr]
    ax.scatter(t, d, s=3, color="#264653", label="one-way delay of each datagram")
    top = max(d + [1.0]) * 1.15
    end = max(t + [0.0])
    for p in data["paths"]:
        lo = p["from_s"]
        hi = p["to_s"] if p["to_s"] is not None else end
        ax.axvspan(lo, hi, color=PATH_COLORS.get(p["path"], "#cccccc"), alpha=0.25, lw=0)
    for e in data["events"]:
        ax.axvline(e["t_s"], color="#555555", lw=0.8, ls="--")
        ax.text(e["t_s"], top * 0.97, " " + e["what"], rotation=90, va="top", fontsize=7)
    ax.set_ylim(0, top)
    ax.set_xlabel("seconds since the direct path was cut")
    ax.set_ylabel("one-way delay, ms")
    ax.set_title(f"Failover: {data['interval_ms']} ms flow a1 → b1; gap at the cut "
                 f"{data['gap_failover_s']:.2f} s, moving back {data['gap_back_s']:.2f} s, "
                 f"{data['lost']} of {data['sent']} lost")
    handles = [Patch(color=PATH_COLORS[p], alpha=0.25, label=f"path: {p}") for p in ("direct", "none", "relay")]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    save(fig, out, "failover-timeline", fmt)


def rendezvous_rss(results, out, fmt):
    pts = []
    for path in sorted(glob.glob(os.path.join(results, "rendezvous-rss", "*.json"))):
        r = load(path)
        if r and r.get("server_rss_after_kib") and r.get("registered"):
            pts.append((r["registered"], r["server_rss_after_kib"] / 1024, r.get("server_rss_before_kib", 0) / 1024))
    if not pts:
        print("  skip: no rendezvous-rss/*.json", file=sys.stderr)
        return
    pts.sort()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#264653", label="RSS with clients connected")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color="#999999", label="RSS at start")
    if len(pts) >= 2:
        slope = (pts[-1][1] - pts[0][1]) * 1024 * 1024 / max(1, pts[-1][0] - pts[0][0])
        ax.set_title(f"Rendezvous memory vs connected clients (≈ {slope / 1024:.1f} KiB per client)")
    else:
        ax.set_title("Rendezvous memory vs connected clients")
    ax.set_xlabel("registered clients (QUIC connections)")
    ax.set_ylabel("server RSS, MiB")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    save(fig, out, "rendezvous-rss", fmt)


def newest(results, pattern):
    """(path, summary) of the newest `pattern` run by its meta start time, or None."""
    best = None
    for path in sorted(glob.glob(os.path.join(results, pattern, "summary.json"))):
        s = load(path)
        if not s:
            continue
        started = s["meta"].get("started") or str(s["meta"].get("unix_time", ""))
        if best is None or started >= best[2]:
            best = (path, s, started)
    return best[:2] if best else None


TRANSPORT_COLORS = {"udp": "#264653", "tcp": "#2a9d8f", "tls": "#e9c46a"}


def transport_pps(results, out, fmt):
    found = newest(results, "transport-*")
    if not found:
        print("  skip: no transport-*/summary.json (loadtest/bench/transport.sh)", file=sys.stderr)
        return
    path, s = found
    meta = s["meta"]
    sides = meta.get("sides", f"{meta['a']} {meta['b']}").split()
    sizes = sorted({c["size"] for c in s["cases"]}, key=lambda z: int(z) if z.isdigit() else 0)
    by = {(c["size"], c["side"]): c for c in s["cases"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(sides), 1)
    xs = range(len(sizes))
    for k, side in enumerate(sides):
        pps = [(by.get((z, side)) or {}).get("pps") or 0 for z in sizes]
        cpu = [(by.get((z, side)) or {}).get("server_cpu_us_per_packet") or 0 for z in sizes]
        off = (k - (len(sides) - 1) / 2) * width
        color = TRANSPORT_COLORS.get(side.rsplit("-", 1)[-1], None)
        ax1.bar([x + off for x in xs], [v / 1000 for v in pps], width, label=side, color=color)
        ax2.bar([x + off for x in xs], cpu, width, label=side, color=color)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), [f"{z} B" for z in sizes])
        ax.legend(frameon=False)
        ax.grid(axis="y", alpha=0.3)
    ax1.set_ylabel("max delivered kpps (loss < 1 %, two passing trials)")
    ax2.set_ylabel("relay CPU µs per delivered packet")
    quota = 100 * meta["quota_us"] / meta["period_us"]
    fig.suptitle(f"meshpunch-relay on {quota:.0f} % of one core, clients on UDP / TURN-over-TCP / TLS "
                 f"(realistic pattern), median of {meta['rounds']} rounds — {meta.get('started', '')}")
    fig.text(0.5, -0.06, f"source: {os.path.relpath(path)}; load before: {meta.get('load_before', '?')}",
             ha="center", fontsize=7)
    save(fig, out, "relay-transport", fmt)


def tunnel_paths(results, out, fmt):
    found = newest(results, "tunnel-*")
    if not found:
        print("  skip: no tunnel-*/summary.json (loadtest/bench/tunnel.sh)", file=sys.stderr)
        return
    path, s = found
    meta = s["meta"]
    paths = ["lan", "direct", "relay"]
    setups = ["meshpunch", "plain-wireguard"]
    by = {(c["setup"], c["path"]): c for c in s["cells"]}
    colors = {"meshpunch": "#264653", "plain-wireguard": "#e76f51"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    xs = range(len(paths))
    for k, setup in enumerate(setups):
        off = (k - 0.5) * width
        cells = [by.get((setup, p)) for p in paths]
        present = [(x, c) for x, c in zip(xs, cells) if c]
        ax1.bar([x + off for x, _ in present], [c["mbps"] or 0 for _, c in present], width,
                label=setup, color=colors[setup])
        ax2.bar([x + off for x, _ in present], [c["tunnel_cpu_s_per_gb"] or 0 for _, c in present], width,
                label=setup, color=colors[setup])
    relay = by.get(("meshpunch", "relay"))
    if relay and relay.get("relay_cpu_s_per_gb"):
        ax2.bar([2 + 0.5 * width], [relay["relay_cpu_s_per_gb"]], width, label="relay server",
                color="#e9c46a")
    labels = list(paths)
    if "meshpunch_relay_vs_direct" in s.get("ratios", {}):
        labels[2] += f"\n{s['ratios']['meshpunch_relay_vs_direct']:.2f}× direct"
    labels[2] += "\n(no plain WG: no TURN)"
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), labels)
        ax.legend(frameon=False, loc="best")
        ax.grid(axis="y", alpha=0.3)
    ax1.set_ylabel("iperf3 TCP Mbit/s through WireGuard")
    ax2.set_ylabel("CPU seconds per GB (tunnel processes, both hosts)")
    fig.suptitle(f"Tunnel throughput per path kind (NAT lab), median of {meta.get('rounds')} "
                 f"rounds × {meta.get('secs')} s")
    fig.text(0.5, -0.1, f"source: {os.path.relpath(path)}; client {meta.get('client')}; "
             f"load: {meta.get('load', '?')}", ha="center", fontsize=7)
    save(fig, out, "tunnel-paths", fmt)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(root, "bench", "results"))
    ap.add_argument("--out", default=os.path.join(root, "docs", "bench"))
    ap.add_argument("--format", default="svg", choices=["svg", "png"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for fig in (nat_matrix, relay_vs_coturn, failover_timeline, rendezvous_rss, transport_pps,
                tunnel_paths):
        print(f"{fig.__name__}:")
        fig(a.results, a.out, a.format)


if __name__ == "__main__":
    main()
