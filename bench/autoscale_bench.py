"""Autoscaling under a steady load (issue 17, must-show 1): does it scale up within two
windows, hold still for 10 minutes of steady load (no flapping), and scale down after the
stabilisation window once the load stops? Prints the figures; passes or fails nothing.

Real run (root; one netns host, the real CLI):

    .venv/bin/python bench/autoscale_bench.py [--minutes 10] [--load 0.4]

The service's tasks share a fixed total demand of ``--load`` CPUs (each task burns
load / (live tasks) CPU, the live tasks counted from heartbeat files in a bind-mounted
directory), each limited to 0.2 CPU, with ``--autoscale min=1,max=6,cpu=50%``: the
steady answer is ceil(load / 0.1) tasks. Samples `service inspect` every 5 s.

Simulation (no root, seconds): ``--sim`` runs the same decision function
(shoal.node.autoscale.decide) every period over per-task usage with ±20 % noise.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# each task: heartbeat a file, burn its share of the total demand in 100 ms cycles
TASK = r"""
import glob, os, socket, time
d = '/ctl'; me = f"{d}/t-{socket.gethostname()}-{os.getpid()}"
while True:
    now = time.time()
    open(me, 'w').close()
    try:
        total = float(open(f'{d}/load').read())
    except (OSError, ValueError):
        total = 0.0
    live = [p for p in glob.glob(f'{d}/t-*') if now - os.path.getmtime(p) < 3]
    share = total / max(1, len(live))
    start = time.process_time(); t0 = time.monotonic()
    while time.process_time() - start < share * 0.1 and time.monotonic() - t0 < 0.1:
        pass
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
"""


def simulate(minutes: float, load: float, seed: int) -> None:
    from shoal.node.autoscale import decide
    from shoal.raft.spec import Autoscale

    auto = Autoscale(min=1, max=6, cpu=0.5, period=15.0, window=30.0)
    rng = random.Random(seed)
    current, hist, counts = 1, [], [1]
    periods = int(minutes * 60 / auto.period)
    for i in range(periods):
        per_task = min(0.2, load / current) / 0.2  # fraction of the 0.2 CPU limit
        usages = [max(0.0, per_task * (1 + rng.uniform(-0.2, 0.2))) for _ in range(current)]
        d, rec = decide(auto, current, usages, [], hist, i * auto.period)
        hist.append((i * auto.period, rec))
        current = d.desired
        counts.append(current)
    settle = max([i + 1 for i, (a, b) in enumerate(itertools.pairwise(counts)) if a != b],
                 default=0)
    steady = counts[settle:]
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    print(f"simulated {minutes:g} min, load {load} CPU, ±20 % noise per task: settled at "
          f"{counts[-1]} replicas after {settle * auto.period:.0f} s; {changes} changes in "
          f"all, {sum(1 for a, b in itertools.pairwise(steady) if a != b)} after "
          f"settling; max seen {max(counts)}")


def real(minutes: float, load: float) -> None:
    from netlab import Lab, wait_until

    lab = Lab(1)
    try:
        lab.form_cluster(managers=1)
        h = lab.hosts[0]
        ctl = h.data_dir / "ctl"
        ctl.mkdir()
        (ctl / "load").write_text(str(load))
        t0 = time.monotonic()
        h.cli("service", "create", "--name", "auto", "--limit-cpu", "0.2",
              "--autoscale", "min=1,max=6,cpu=50%",
              "--mount", f"type=bind,src={ctl},dst=/ctl", "--", "python3", "-c", TASK)

        def svc() -> dict[str, Any]:
            out: dict[str, Any] = h.cli_json("service", "inspect", "auto")[0]
            return out

        want = max(1, min(6, -(-round(load * 100) // 10)))
        wait_until(lambda: svc()["spec"]["mode"]["replicas"] >= want, timeout=600,
                   interval=2.0, what=f"scaled up to {want}")
        up = time.monotonic() - t0
        print(f"scaled up to >= {want} replicas in {up:.0f} s (window 30 s, period 15 s)")
        counts: list[int] = []
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            counts.append(svc()["spec"]["mode"]["replicas"])
            time.sleep(5.0)
        changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
        print(f"steady load {load} CPU for {minutes:g} min: replicas min {min(counts)} max "
              f"{max(counts)}, {changes} changes ({len(counts)} samples)")
        (ctl / "load").write_text("0")
        t1 = time.monotonic()
        wait_until(lambda: svc()["spec"]["mode"]["replicas"] == 1, timeout=900,
                   interval=2.0, what="scaled down to 1")
        print(f"load stopped: back to 1 replica in {time.monotonic() - t1:.0f} s "
              "(stabilisation window 300 s)")
        for d in svc()["autoscale"]["decisions"]:
            print(f"  {d['current']} -> {d['desired']}: {d['reason']}")
    finally:
        left = lab.close()
        if left:
            print(f"teardown left: {left}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.4, help="total CPU demand")
    ap.add_argument("--sim", action="store_true", help="decision function only, no lab")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.sim:
        simulate(args.minutes, args.load, args.seed)
    else:
        real(args.minutes, args.load)


if __name__ == "__main__":
    main()
