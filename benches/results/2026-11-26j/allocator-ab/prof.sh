#!/bin/bash
# usage: prof.sh PHASE  -> perf record of the tsunagu server during one phase
B=${BIN:-/work/cargo-target/release/tsunagu}
rm -rf /tmp/feas/tsu; mkdir -p /tmp/feas/tsu
cat > /tmp/feas/tsu.toml <<T
[server]
ae_title = "TSUNAGU"
dicom_port = 11114
http_port = 8089
bind = "127.0.0.1"
[storage]
url = "file:///tmp/feas/tsu"
[index]
url = "sqlite:///tmp/feas/tsu/index.sqlite"
[[institution]]
code = "BENCH"
name = "Benchmark"
issuer_of_patient_id = "BENCH"
ae_titles = ["BENCHSCU"]
T
RUST_LOG=warn $B serve --config /tmp/feas/tsu.toml > /tmp/feas/tsu.log 2>&1 & T=$!
for i in $(seq 50); do curl -sf http://127.0.0.1:8089/readyz >/dev/null && break; sleep 0.2; done
if [ -n "$PERF" ]; then perf record -F 2000 -g -p $T -o /tmp/feas/perf-$1.data 2>/dev/null & P=$!; sleep 0.3; fi
python3 "$(dirname "$0")/../../2026-11-26i/ingest-feasibility/measure.py" $T 11114 TSUNAGU $1
[ -n "$PERF" ] && { kill -INT $P; wait $P; }
kill $T; wait $T 2>/dev/null
