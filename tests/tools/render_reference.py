#!/usr/bin/env python3
"""The 8-bit picture PS3.3 says a frame is displayed as, computed by pydicom and
numpy, for comparison with tsunagu's rendered resources. One JSON line per file:
{"file", "frame", "rows", "columns", "samples", "pixels": base64 of uint8}

Grey: Modality LUT (rescale), then the first window's LINEAR VOI function of
PS3.3 C.11.2.1.2.1 onto 0-255 (min-max when there is no window),
MONOCHROME1 inverted. PALETTE COLOR: the palette LUTs, high byte of each
16-bit entry. RGB: as decoded.

  render_reference.py FRAME FILE...     (FRAME is 1-based)
"""
import base64
import json
import sys

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut


def linear_window(x, center, width):
    # PS3.3 C.11.2.1.2.1, ymin 0, ymax 255.
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))
    return y


def first(v):
    return float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)


def picture(ds, frame):
    arr = ds.pixel_array
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    if nf > 1:
        arr = arr[frame - 1]
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:
            rgb = (rgb >> 8).astype(np.uint8)
        return rgb.astype(np.uint8)
    if ds.SamplesPerPixel == 3:
        return arr.astype(np.uint8)
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        y = linear_window(x, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        lo, hi = x.min(), x.max()
        y = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    if pi == "MONOCHROME1":
        y = 255.0 - y
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


frame = int(sys.argv[1])
for f in sys.argv[2:]:
    ds = pydicom.dcmread(f)
    p = picture(ds, frame)
    print(json.dumps({
        "file": f,
        "frame": frame,
        "rows": int(p.shape[0]),
        "columns": int(p.shape[1]),
        "samples": 1 if p.ndim == 2 else int(p.shape[2]),
        "pixels": base64.b64encode(np.ascontiguousarray(p).tobytes()).decode(),
    }))
