#!/usr/bin/env python3
"""Medians over rounds of peer_bench figures, two targets side by side.

  bench_web_summary.py OUTDIR OURS PEER   (reads OUTDIR/round-*/<label>.json)

The ratio is always "how many times better than the peer": peer/ours for
times, ours/peer for rates.
"""
import glob, json, os, statistics, sys

out, ours, peer = sys.argv[1:4]


def figures(label):
    per = {}
    names = {}
    for p in sorted(glob.glob(os.path.join(out, "round-*", f"{label}.json"))):
        for f in json.load(open(p))["figures"]:
            s = f.get("stats", {})
            if s.get("n"):
                per.setdefault(f["id"], []).append(s["median"])
                names[f["id"]] = (f.get("name", f["id"]), f.get("unit", ""), f.get("results"))
    return {k: (statistics.median(v), len(v)) for k, v in per.items()}, names


a, names = figures(ours)
b, names_b = figures(peer)
names.update({k: v for k, v in names_b.items() if k not in names})
print(f"| figure | {ours} | {peer} | ratio (× better) | rounds |")
print("|---|---|---|---|---|")
for fid in sorted(set(a) | set(b), key=lambda k: list(names).index(k) if k in names else 0):
    name, unit, _ = names.get(fid, (fid, "", None))
    x, y = a.get(fid), b.get(fid)
    if x and y and x[0] > 0 and y[0] > 0:
        lower_better = unit in ("ms", "s", "µs", "us")
        ratio = y[0] / x[0] if lower_better else x[0] / y[0]
        r = f"{ratio:.1f}×"
    else:
        r = "—"
    fmt = lambda v: "—" if v is None else f"{v[0]:.3g} {unit}"
    print(f"| {name} | {fmt(x)} | {fmt(y)} | {r} | {max((x or (0, 0))[1], (y or (0, 0))[1])} |")
