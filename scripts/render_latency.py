#!/usr/bin/env python3
"""Rendered-picture latencies of DICOMweb servers (scripts/bench-render).

  render_latency.py MANIFEST NAME=URL... [--header NAME=HEADER]...   one round -> JSON
  render_latency.py --summary ROUND.json...                          medians -> markdown

Each figure: one request over a new connection (curl), median of RUNS after a
warm-up; "16 slices" renders 16 distinct slices one after another over one
keep-alive connection (requests), slices per second.
"""
import json
import statistics
import subprocess
import sys
import time

import requests

RUNS, WARMUP = 30, 3


def curl_ms(url, accept, headers):
    argv = ["curl", "-s", "-g", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}",
            "-H", f"Accept: {accept}"]
    for h in headers:
        argv += ["-H", h]
    out = subprocess.run(argv + [url], capture_output=True, text=True).stdout.split()
    if len(out) != 3 or out[0] != "200":
        raise SystemExit(f"{url}: {out}")
    return float(out[1]) * 1000, int(float(out[2]))


def median_ms(url, accept, headers):
    samples = [curl_ms(url, accept, headers) for _ in range(WARMUP + RUNS)][WARMUP:]
    return {"ms": statistics.median(s[0] for s in samples), "bytes": samples[0][1]}


def one_round(manifest, targets, headers):
    ct = next(s for s in manifest["studies"] if s.get("set") == "ct")
    se = ct["series"][0]
    inst = se["instances"][len(se["instances"]) // 2]
    series = f"studies/{ct['study_uid']}/series/{se['series_uid']}"
    one = f"{series}/instances/{inst['sop_uid']}"
    out = {}
    for name, base in targets.items():
        h = headers.get(name, [])
        fig = {
            "rendered jpeg": median_ms(f"{base}/{one}/rendered", "image/jpeg", h),
            "rendered png": median_ms(f"{base}/{one}/rendered", "image/png", h),
            "frame 1 rendered jpeg": median_ms(f"{base}/{one}/frames/1/rendered", "image/jpeg", h),
        }
        if name == "tsunagu":
            fig["instance thumbnail"] = median_ms(f"{base}/{one}/thumbnail", "image/jpeg", h)
            fig["series thumbnail"] = median_ms(f"{base}/{series}/thumbnail", "image/jpeg", h)
        s = requests.Session()
        s.headers.update(dict(x.split(": ", 1) for x in h))
        sixteen = se["instances"][:16]
        t0 = time.perf_counter()
        for i in sixteen:
            r = s.get(f"{base}/{series}/instances/{i['sop_uid']}/rendered", headers={"Accept": "image/jpeg"})
            assert r.status_code == 200, (name, r.status_code)
        fig["16 slices/s"] = {"per_s": len(sixteen) / (time.perf_counter() - t0)}
        out[name] = fig
    return out


def summary(paths):
    rounds = [json.load(open(p)) for p in paths]
    names = list(rounds[0])
    figures = list(rounds[0]["tsunagu"])
    lines = [f"Medians of {len(rounds)} rounds (each a median of {RUNS} requests).", "",
             "| figure | " + " | ".join(names) + " | tsunagu ÷ orthanc |", "|---" * (len(names) + 2) + "|"]
    for f in figures:
        cells, vals = [], {}
        for n in names:
            if f not in rounds[0][n]:
                cells.append("—")
                continue
            key = "per_s" if "per_s" in rounds[0][n][f] else "ms"
            v = statistics.median(r[n][f][key] for r in rounds)
            vals[n] = (key, v)
            unit = "/s" if key == "per_s" else " ms"
            size = rounds[0][n][f].get("bytes")
            cells.append(f"{v:.1f}{unit}" + (f" ({size / 1000:.1f} kB)" if size else ""))
        ratio = ""
        if "orthanc" in vals and "tsunagu" in vals:
            key, t = vals["tsunagu"]
            o = vals["orthanc"][1]
            ratio = f"**{(t / o if key == 'per_s' else o / t):.1f}×**"
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv):
    if argv[0] == "--summary":
        print(summary(argv[1:]))
        return
    manifest = json.load(open(argv[0]))
    targets, headers, i = {}, {}, 1
    while i < len(argv):
        if argv[i] == "--header":
            n, h = argv[i + 1].split("=", 1)
            headers.setdefault(n, []).append(h)
            i += 2
        else:
            n, u = argv[i].split("=", 1)
            targets[n] = u
            i += 1
    print(json.dumps(one_round(manifest, targets, headers)))


main(sys.argv[1:])
