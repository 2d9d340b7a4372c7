"""Task-to-task networking across nodes: VXLAN overlay vs host-gw vs a direct veth, in one run.

    .venv/bin/python bench/overlay_bench.py [--seconds 5] [--rounds 3]

Needs root, iproute2, tini and Debian's `iperf3` (it installs nothing: it says what is
missing). Layout: two netns hosts on one bridge (tests/netlab.py) running real shoal agents
(1 manager + 1 worker); a server task on h2 and a client task on h1 for each path:

  host-gw  both tasks on the default network (veth -> bridge -> host route via h2 -> bridge)
  overlay  both tasks on `shoal network create bench` (veth -> bridge -> VXLAN/UDP -> ...)
  direct   two namespaces joined by one veth pair, no shoal at all (the floor)

Each server task runs `iperf3 -s` and a TCP echo server; the bench enters the client task's
network namespace (nsenter) and runs, per path and round:

  bulk     iperf3, 1 TCP stream, ``--seconds`` s: receiver throughput (Gbit/s)
  rr       one TCP connection (TCP_NODELAY), 64-byte request -> 64-byte reply, back to back for
           ``--seconds`` s (a Python client: its own overhead is the same on every path):
           requests/s and p50/p99 round trip; "added" = minus the direct veth's percentile.

Rounds interleave the paths (noise on this shared 2-core machine hits all of them). Prints
one table (median of rounds) and a JSON line. Everything is removed on exit, also on failure.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab, wait_until

ECHO_PORT = 7000
SERVER = r"""
import socket, subprocess, threading
subprocess.Popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("", ECHO_PORT))
srv.listen(16)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d:
            return
        c.sendall(d)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
""".replace("ECHO_PORT", str(ECHO_PORT))

RR = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], ECHO_PORT), 5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, rtts, end = b"x" * 64, [], time.perf_counter() + float(sys.argv[2])
while True:
    t0 = time.perf_counter()
    if t0 >= end:
        break
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    rtts.append(time.perf_counter() - t0)
rtts.sort()
print(json.dumps({"n": len(rtts), "seconds": float(sys.argv[2]),
                  "p50_us": rtts[len(rtts) // 2] * 1e6,
                  "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6}))
""".replace("ECHO_PORT", str(ECHO_PORT))


def run(argv: list[str], timeout: float = 120.0) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}...: {res.stderr.strip()}")
    return res.stdout


def measure(netns: str, addr: str, seconds: float) -> dict[str, float]:
    """Bulk and request/response from the namespace ``netns`` (a /proc/PID/ns/net path or a
    /var/run/netns path) to ``addr``."""
    enter = ["nsenter", f"--net={netns}"]
    bulk = json.loads(run([*enter, "iperf3", "-c", addr, "-p", "5201", "-t", str(seconds),
                           "-J"]))
    gbps = bulk["end"]["sum_received"]["bits_per_second"] / 1e9
    rr = json.loads(run([*enter, sys.executable, "-c", RR, addr, str(seconds)]))
    return {"gbps": gbps, "rps": rr["n"] / rr["seconds"], "p50_us": rr["p50_us"],
            "p99_us": rr["p99_us"]}


class DirectPair:
    """Two namespaces joined by one veth pair (10.250.0.1 <-> .2), the server in the 2nd."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.a, self.b = f"shoal-bench-{tag}-a", f"shoal-bench-{tag}-b"
        self.server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DirectPair:
        for ns in (self.a, self.b):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
             "netns", self.b])
        for ns, ip in ((self.a, "10.250.0.1"), (self.b, "10.250.0.2")):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self.server = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{self.b}",
                                        sys.executable, "-c", SERVER],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self

    def __exit__(self, *_: object) -> None:
        if self.server is not None:
            pids = subprocess.run(["ip", "netns", "pids", self.b], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            self.server.wait(timeout=10)
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def task_of(lab: Lab, service: str) -> dict[str, Any]:
    h1 = lab.hosts[0]

    def up() -> dict[str, Any] | None:
        tasks = [t for t in h1.cli_json("service", "ps", service) if t["state"] == "running"
                 and t.get("pid") and t.get("addr")]
        return tasks[0] if tasks else None
    return wait_until(up, timeout=60, interval=0.3, what=f"{service} running")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    missing = [t for t in ("iperf3", "nsenter", "ip", "tini") if shutil.which(t) is None]
    if missing:
        print(f"missing: {' '.join(missing)} (apt-get install iperf3 iproute2 util-linux tini)")
        return 2
    results: dict[str, list[dict[str, float]]] = {"direct": [], "host-gw": [], "overlay": []}
    with Lab(2) as lab, DirectPair() as direct:
        lab.form_cluster(managers=1, workers=1)
        h1, h2 = lab.hosts
        h1.cli("network", "create", "bench")
        for mode, extra in (("gw", []), ("ov", ["--network", "bench"])):
            h1.cli("service", "create", "--name", f"srv-{mode}", "--constraint",
                   f"node.ip=={h2.ip}", *extra, "--", "python3", "-c", SERVER)
            h1.cli("service", "create", "--name", f"cli-{mode}", "--constraint",
                   f"node.ip=={h1.ip}", *extra, "--", "sleep", "1000000")
        paths: dict[str, tuple[str, str]] = {"direct": ("/var/run/netns/" + direct.a,
                                                        "10.250.0.2")}
        for mode, name in (("gw", "host-gw"), ("ov", "overlay")):
            srv, cli = task_of(lab, f"srv-{mode}"), task_of(lab, f"cli-{mode}")
            paths[name] = (f"/proc/{cli['pid']}/ns/net", srv["addr"])
        time.sleep(1.0)  # servers listening
        for r in range(args.rounds):
            for name, (netns, addr) in paths.items():
                got = measure(netns, addr, args.seconds)
                results[name].append(got)
                print(f"round {r + 1} {name:8} {got['gbps']:6.2f} Gbit/s "
                      f"{got['rps']:8.0f} req/s p50 {got['p50_us']:6.1f} us "
                      f"p99 {got['p99_us']:6.1f} us", flush=True)
        ov = json.loads(h1.cli("info").stdout)["network"].get("overlay", {}) \
            .get("networks", {}).get("bench", {})
        mtu = ov.get("mtu")
        # proof the overlay path is VXLAN: bytes the client node's VXLAN device carried
        link = json.loads(run(["ip", "-n", h1.netns, "-s", "-j", "link", "show", "dev",
                               "shx" + str(ov.get("vni"))]))[0]
        vx_bytes = link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
        print(f"VXLAN device on h1 carried {vx_bytes / 1e9:.1f} GB", flush=True)
    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
           for name, rows in results.items()}
    base = med["direct"]
    print(f"\nmedian of {args.rounds} rounds, {args.seconds:g} s each (overlay MTU {mtu}):")
    print(f"{'path':9} {'bulk Gbit/s':>11} {'x host-gw':>9} {'req/s':>8} {'p50 us':>7} "
          f"{'p99 us':>7} {'+p50 us':>8} {'+p99 us':>8}")
    for name, m in med.items():
        print(f"{name:9} {m['gbps']:11.2f} {m['gbps'] / med['host-gw']['gbps']:9.2f} "
              f"{m['rps']:8.0f} {m['p50_us']:7.1f} {m['p99_us']:7.1f} "
              f"{m['p50_us'] - base['p50_us']:8.1f} {m['p99_us'] - base['p99_us']:8.1f}")
    # paired per round (the paths of one round ran back to back: shared load hits all)
    ratios = sorted(o["gbps"] / g["gbps"] for o, g in zip(results["overlay"],
                                                          results["host-gw"], strict=True))
    print(f"overlay / host-gw bulk, per round: median {statistics.median(ratios):.2f} "
          f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f})")
    print(json.dumps({"median": med, "ratios": ratios, "rounds": results, "overlay_mtu": mtu,
                      "vxlan_bytes": vx_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
