#!/usr/bin/env python3
"""Open N associations and keep every one open until all are established,
then send one C-STORE on each (while all are still open) and release them.
Proves the server holds N associations at once, not one after another.
Prints one JSON line: {"established": k, "statuses": [...]}.

  hold.py HOST PORT CALLING CALLED N FILE
"""
import json
import sys
import time

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context

host, port, calling, called, n, file = sys.argv[1:]
meta = dcmread(file, stop_before_pixels=True).file_meta
ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
ae.requested_contexts = [
    build_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
]
held = []
# Associations of an earlier sender may still be closing on the server and
# hold its slots a moment: a transient refusal is tried again, for a while.
deadline = time.monotonic() + 20
while len(held) < int(n):
    a = ae.associate(host, int(port), ae_title=called)
    if a.is_established:
        held.append(a)
    elif a.is_rejected and time.monotonic() < deadline:
        time.sleep(0.1)
    else:
        break
statuses = []
for a in held:
    s = a.send_c_store(file)
    statuses.append(int(s.Status) if s and "Status" in s else None)
for a in held:
    a.release()
print(json.dumps({"established": len(held), "statuses": statuses}))
