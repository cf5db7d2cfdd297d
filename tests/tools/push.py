#!/usr/bin/env python3
"""Push Part-10 files with pynetdicom, each in its own transfer syntax, with
the data set bytes sent exactly as they are in the file (pynetdicom >= 2 sends
a file path without decoding it). One JSON line per file:
{"file", "status", "ts", "accepted"}; exit 0 if the association worked.

  push.py HOST PORT CALLING CALLED FILE...
"""
import json
import sys

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

host, port, calling, called, *files = sys.argv[1:]
ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
metas = []
pairs = []
for f in files:
    m = dcmread(f, stop_before_pixels=True)
    sop_class, ts = str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID)
    metas.append((f, sop_class, ts))
    if (sop_class, ts) not in pairs:
        pairs.append((sop_class, ts))
if len(pairs) > 128:
    sys.exit("more than 128 presentation contexts needed")
ae.requested_contexts = [build_context(c, [t]) for c, t in pairs]
assoc = ae.associate(host, int(port), ae_title=called)
if not assoc.is_established:
    print(json.dumps({"associated": False, "rejected": assoc.is_rejected}))
    sys.exit(1)
accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
for f, sop_class, ts in metas:
    if (sop_class, ts) not in accepted:
        print(json.dumps({"file": f, "status": None, "ts": ts, "accepted": False}))
        continue
    status = assoc.send_c_store(f)
    code = int(status.Status) if status and "Status" in status else None
    print(json.dumps({"file": f, "status": code, "ts": ts, "accepted": True}), flush=True)
assoc.release()
