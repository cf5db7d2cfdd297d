#!/usr/bin/env python3
"""Summarize scripts/bench-ingest rounds: medians over rounds, ratios against peers.

  bench_summary.py OUTDIR      (reads OUTDIR/round-*/<label>.json and bound-*.txt)
"""
import glob, json, os, re, statistics, sys

out = sys.argv[1]
FIGS = [("ingest.ct.1assoc", "CT 256×512², 1 association"),
        ("ingest.ct.4assoc", "CT 256×512², 4 associations"),
        ("ingest.small.1assoc", "3000 small instances, 1 association")]


def bound(kind):
    per = {1: [], 4: []}
    for p in sorted(glob.glob(os.path.join(out, f"bound-{kind}-*.txt"))):
        for line in open(p):
            m = re.match(r"durable bound, (\d+) thread\(s\): (\d+) inst/s, (\d+) MB/s", line)
            if m:
                per[int(m.group(1))].append((float(m.group(2)), float(m.group(3))))
    return {k: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) if v else None
            for k, v in per.items()}


def target(label):
    figs = {}
    for p in sorted(glob.glob(os.path.join(out, "round-*", f"{label}.json"))):
        for f in json.load(open(p))["figures"]:
            if f.get("stats", {}).get("n"):
                figs.setdefault(f["id"], []).append(f)
    res = {}
    for fid, fs in figs.items():
        res[fid] = {
            "inst": statistics.median(f["stats"]["median"] for f in fs),
            "mb": statistics.median(f["mb_per_s"]["median"] for f in fs),
            "cpu": statistics.median(f["server_cpu_s"]["median"] for f in fs) if all("server_cpu_s" in f for f in fs) else None,
            "rss": max((f.get("server_rss_peak_mb") or 0) for f in fs),
            "rounds": len(fs),
        }
    return res


labels = ["tsunagu", "storescp", "orthanc"]
data = {l: target(l) for l in labels}
bct, bsmall = bound("ct"), bound("small")
print("| figure | " + " | ".join(labels) + " | durable bound | tsunagu/bound | tsunagu/storescp | tsunagu/orthanc |")
print("|---|" + "---|" * (len(labels) + 4))
for fid, title in FIGS:
    cells = []
    for l in labels:
        d = data[l].get(fid)
        if not d:
            cells.append("—")
            continue
        extra = ""
        if d["cpu"] is not None and l != "storescp":
            extra += f", CPU {d['cpu']:.2f} s"
        if d["rss"] and l != "storescp":
            extra += f", RSS {d['rss']:.0f} MB"
        cells.append(f"{d['inst']:.0f} inst/s, {d['mb']:.0f} MB/s{extra} (n={d['rounds']})")
    b = (bsmall if "small" in fid else bct)[4 if "4assoc" in fid else 1]
    t = data["tsunagu"].get(fid)
    r = lambda peer: (f"{t['inst'] / data[peer][fid]['inst']:.2f}×" if t and data[peer].get(fid) else "—")
    cells.append(f"{b[0]:.0f} inst/s, {b[1]:.0f} MB/s ({'4' if '4assoc' in fid else '1'} thr)" if b else "—")
    cells.append(f"{t['inst'] / b[0]:.2f}×" if t and b else "—")
    cells += [r("storescp"), r("orthanc")]
    print(f"| {title} | " + " | ".join(cells) + " |")
