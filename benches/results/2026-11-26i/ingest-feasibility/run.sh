#!/bin/bash
# rounds of: durable bound, storescp +B, tsunagu; CT 1 and 4 assoc, small.
set -e
B=/work/cargo-target/release/tsunagu
V=~/.cache/tsunagu/venv/bin/python
for r in 1 2 3; do
  rm -rf /tmp/feas/bound; mkdir -p /tmp/feas/bound
  /usr/bin/time -f "bound-ct cpu %U %S wall %e" python3 /work/shared/bench/durable_bound.py --threads 4 --dir /tmp/feas/bound /tmp/feas/corpus/ct/*/*.dcm
  /usr/bin/time -f "bound-small cpu %U %S wall %e" python3 /work/shared/bench/durable_bound.py --threads 4 --dir /tmp/feas/bound $(find /tmp/feas/corpus/query -name '*.dcm' | sort)
  for ph in ct1 ct4 small; do
    rm -rf /tmp/feas/scp; mkdir -p /tmp/feas/scp
    TCP_NODELAY=1 /usr/bin/storescp --fork -aet STORESCP -pdu 16384 -od /tmp/feas/scp -dhl +B 11113 & SCP=$!; sleep 0.5
    echo "storescp $(python3 /tmp/feas/measure.py $SCP 11113 STORESCP $ph)"
    kill $SCP; wait $SCP 2>/dev/null || true
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
    echo "tsunagu $(python3 /tmp/feas/measure.py $T 11114 TSUNAGU $ph)"
    kill $T; wait $T 2>/dev/null || true
  done
done
