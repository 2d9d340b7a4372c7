"""Registry fan-out benchmark: N nodes starting a new image at once vs one node alone (prints
figures, never passes or fails).

Owns: a netns lab (tests/netlab.py) of ``--nodes`` agents (1 manager + workers) plus a host
running the registry (Debian's docker-registry, TLS from a test CA, htpasswd Basic auth, as in
tests/test_registry_cluster.py), two images of about ``--mib`` MiB each in ``--layers`` layers
of incompressible data (different bytes, same shape). Must not touch: anything outside the
lab (the lab cleans up its namespaces, processes and files).

* one node alone: ``service create --replicas 1`` of image A; seconds from the create until
  its task runs;
* all nodes at once: ``service create --replicas N`` of image B (the scheduler spreads one
  task per node); seconds until all N run;
* the registry's access log gives the bytes it served for B's layers; ÷ B's size is the
  "copies" figure (target ≤ 1.3: peers share the layers), and the time ratio targets ≤ 1.5x.

    .venv/bin/python bench/registry_fanout.py [--nodes 5] [--mib 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import registryd  # (the test helpers: registry, CA, image layouts)

import netlab  # (the test harness: netns hosts, agents, cluster forming)

USER, PASSWORD = "bench", "bench-pass"


def wait_running(h: netlab.Host, svc: str, n: int, timeout: float = 600) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ts = [t for t in h.cli_json("service", "ps", svc)
              if t["state"] == "running" and t["desired_state"] == "running"]
        if len(ts) == n:
            return ts
        time.sleep(0.2)
    raise SystemExit(f"{svc}: {n} tasks not running after {timeout}s")


def served(reg: registryd.Registry, manifest: str) -> tuple[int, int]:
    """(bytes the registry served for the image's layers, the image's layer bytes)."""
    layers = json.loads(reg.blob_path(manifest).read_text())["layers"]
    size = sum(int(layer["size"]) for layer in layers)
    return sum(reg.blob_gets(layer["digest"]) * int(layer["size"]) for layer in layers), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64, help="total size of the data layers")
    ap.add_argument("--layers", type=int, default=4, help="data layers")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-fanout-"))
    lab = netlab.Lab(args.nodes + 1)
    reg: registryd.Registry | None = None
    try:
        rh = lab.hosts[args.nodes]
        reg = registryd.Registry(work / "reg", rh.ip, 5000, users={USER: PASSWORD},
                                 spawn=rh.spawn, netns=rh.netns)
        nodes = lab.hosts[:args.nodes]
        for h in nodes:
            h.start_agent("--registry-ca", str(reg.ca))
        lab.form_cluster(managers=1, workers=args.nodes - 1, timeout=180)
        reg.wait_ready()
        layout = work / "layout"
        per = max(1, args.mib // args.layers)
        built = {tag: registryd.build_layout(layout, tag, marker=tag, extra_mib=per,
                                             extra_layers=args.layers) for tag in ("a", "b")}
        for tag in built:
            reg.push(layout, tag, f"bench/app:{tag}")
        h1 = nodes[0]
        shoal = " ".join(h1.shoal_argv)
        h1.run("sh", "-c", f"printf %s '{PASSWORD}' | {shoal} -H unix://{h1.sock} registry "
               f"login -u {USER} --password-stdin {reg.addr}")

        t0 = time.monotonic()
        h1.cli("service", "create", "--name", "one", "--replicas", "1", "--with-registry-auth",
               "--image", f"{reg.addr}/bench/app:a")
        wait_running(h1, "one", 1)
        alone = time.monotonic() - t0
        a_served, a_size = served(reg, built["a"]["manifest"])

        t0 = time.monotonic()
        h1.cli("service", "create", "--name", "many", "--replicas", str(args.nodes),
               "--with-registry-auth", "--image", f"{reg.addr}/bench/app:b")
        ts = wait_running(h1, "many", args.nodes)
        fanout = time.monotonic() - t0
        b_served, b_size = served(reg, built["b"]["manifest"])
        spread = len({t["node"] for t in ts})

        load = os.getloadavg()
        print(f"image: {args.layers + 2} layers, {b_size / 2**20:.1f} MiB; machine load "
              f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} ({os.cpu_count()} cores)")
        print(f"  one node alone:     {alone:6.2f} s, registry served "
              f"{a_served / a_size:.2f}x the image")
        print(f"  {args.nodes} nodes at once:   {fanout:6.2f} s ({spread} distinct nodes), "
              f"registry served {b_served / b_size:.2f}x the image (target <= 1.3)")
        print(f"  time {args.nodes} nodes / one: {fanout / alone:.2f}x (target <= 1.5)")
    finally:
        if reg is not None:
            reg.close()
        left = lab.close()
        if left:
            print(f"lab left behind: {left}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
