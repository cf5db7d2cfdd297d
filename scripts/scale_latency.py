#!/usr/bin/env python3
"""QIDO latency at scale with p99: the query set of ../shared/bench/scale_qido.py
(imported, not copied) plus, optionally, the metadata of one large study.

  scale_latency.py --corpus DIR --dicomweb URL [--header H] [--runs 100] [--rounds 3]
                   [--metadata-study UID] [--label NAME] [--json OUT]

Each round runs every query RUNS times after 2 warm-ups on one keep-alive session;
per query it prints the median over rounds of p50, p90, p99 (ms) and the results.
"""
import argparse, json, os, statistics, sys, time, urllib.parse

import requests

BENCH = os.environ.get("TSUNAGU_BENCH_DIR", os.path.join(os.path.dirname(__file__), "../../shared/bench"))
sys.path.insert(0, BENCH)
from scale_qido import queries  # noqa: E402


def pct(sorted_times, p):
    return sorted_times[min(len(sorted_times) - 1, int(round(p * (len(sorted_times) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--dicomweb", required=True)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--metadata-study")
    ap.add_argument("--label", default="target")
    ap.add_argument("--json")
    a = ap.parse_args()
    m = json.load(open(os.path.join(a.corpus, "manifest.json"), encoding="utf-8"))
    hdr = {"Accept": "application/dicom+json"}
    for h in a.header:
        k, _, v = h.partition(":")
        hdr[k.strip()] = v.strip()
    todo = [(t, f"{a.dicomweb}/studies?" + urllib.parse.urlencode(p, safe="*,")) for t, p in queries(m)]
    if a.metadata_study:
        todo.append((f"study metadata ({a.metadata_study[-12:]})", f"{a.dicomweb}/studies/{a.metadata_study}/metadata"))
    s = requests.Session()
    per = {t: {"p50": [], "p90": [], "p99": [], "results": None, "status": None} for t, _ in todo}
    for _ in range(a.rounds):
        for title, url in todo:
            times = []
            for i in range(a.runs + 2):
                t0 = time.perf_counter()
                r = s.get(url, headers=hdr)
                body = r.content
                dt = (time.perf_counter() - t0) * 1000
                if i >= 2:
                    times.append(dt)
            times.sort()
            e = per[title]
            e["p50"].append(statistics.median(times))
            e["p90"].append(pct(times, 0.90))
            e["p99"].append(pct(times, 0.99))
            e["status"] = r.status_code
            e["results"] = len(json.loads(body)) if r.status_code == 200 and body.strip() else 0
    out = []
    print(f"{a.label}: {len(m['studies'])} studies; {a.rounds} rounds x {a.runs} runs; medians over rounds")
    for title, _ in todo:
        e = per[title]
        row = {"query": title, "results": e["results"], "status": e["status"],
               **{k: statistics.median(e[k]) for k in ("p50", "p90", "p99")}}
        out.append(row)
        print(f"{title:45s} p50 {row['p50']:8.2f}  p90 {row['p90']:8.2f}  p99 {row['p99']:8.2f} ms  "
              f"HTTP {row['status']}  {row['results']} results")
    if a.json:
        json.dump({"label": a.label, "rows": out}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
