#!/usr/bin/env python3
"""Reference facts about Part-10 files, computed by pydicom, for comparison
with what tsunagu extracts at ingest. One JSON line per file:
{"file", "frames": [sha256 of each frame's bytes] | null, "json": DICOM JSON}

  reference.py FILE...
"""
import hashlib
import json
import sys

import pydicom
from pydicom.encaps import generate_frames


def frames(ds):
    if "PixelData" not in ds:
        return None
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        try:
            out = list(generate_frames(ds.PixelData, number_of_frames=nf))
        except Exception:
            return None
        return [hashlib.sha256(f).hexdigest() for f in out] if len(out) == nf else None
    bits = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated
    if bits % 8:
        return None
    n = bits // 8
    return [hashlib.sha256(ds.PixelData[i * n:(i + 1) * n]).hexdigest() for i in range(nf)]


for f in sys.argv[1:]:
    ds = pydicom.dcmread(f)
    doc = ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda e: "bulk")
    print(json.dumps({"file": f, "frames": frames(ds), "json": doc}, ensure_ascii=False))
