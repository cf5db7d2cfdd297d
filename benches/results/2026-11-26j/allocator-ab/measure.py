#!/usr/bin/env python3
"""Ad hoc: wall time and CPU of client (storescu) and server per phase, for one server pid."""
import os, resource, subprocess, sys, time, glob, json
CLK = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / CLK  # utime stime cutime cstime
def phase(server_pid, port, aec, chunks):
    env = dict(os.environ, TCP_NODELAY="1")
    c0 = cpu(server_pid); r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    ps = [subprocess.Popen(["/usr/bin/storescu", "-R", "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), *files],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for files in chunks]
    for p in ps:
        _, e = p.communicate()
        assert p.returncode == 0, e[-500:]
    wall = time.perf_counter() - t0
    time.sleep(0.3)  # let --fork children be reaped
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = sum(len(c) for c in chunks)
    client = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    server = cpu(server_pid) - c0
    return dict(n=n, rate=n / wall, client_ms=1000 * client / n, server_ms=1000 * server / n, wall_ms=1000 * wall / n)
if __name__ == "__main__":
    pid, port, aec, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ct = sorted(glob.glob("/tmp/feas/corpus/ct/*/*.dcm"))
    small = sorted(glob.glob("/tmp/feas/corpus/query/**/*.dcm", recursive=True))
    if what == "ct1": chunks = [ct]
    elif what == "ct4": chunks = [ct[i::4] for i in range(4)]
    else: chunks = [small]
    print(json.dumps(dict(phase=what, **phase(pid, port, aec, chunks))))
