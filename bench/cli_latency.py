"""CLI responsiveness: `shoal service ls|ps|inspect` and `service create -d`, end to end.

    .venv/bin/python bench/cli_latency.py [--runs 20] [--services 10] [--replicas 3]

One netns host (tests/netlab.py) runs a one-node cluster with ``--services`` services of
``--replicas`` sleeping tasks each. Each command is run ``--runs`` times as a new process
from the root namespace against the agent's unix socket (as a script calling the CLI in a
loop does); the figure is that process's wall time from spawn to exit (time.perf_counter
around subprocess.run). Side by side: `python3 -c pass` (the system interpreter, and the
venv's, which also loads the editable install's path finder — an installed wheel does not),
the floor any Python CLI pays, and the docker CLI against dockerd when both are present
(`docker service ls` needs a swarm; otherwise `docker ps`/`docker version`, as noted). The
import set of `service ls` is checked by tests/test_cli_shape.py, never its time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab, shoal_bin, wait_until
from shoal.cli.main import Client

CPU: dict[int, float] = {}  # id(wall list) → the runs' median CPU seconds (user + sys)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv: Sequence[str], runs: int) -> list[float]:
    """Wall seconds of each run (spawn to exit); their CPU time goes to CPU."""
    out, cpu = [], []
    for _ in range(runs):
        c0, t0 = _cpu(), time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
        cpu.append(_cpu() - c0)
    CPU[id(out)] = statistics.median(cpu)
    return out


def row(label: str, xs: list[float]) -> str:
    cpu = CPU.get(id(xs))
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return (f"| {label} | {statistics.median(xs) * 1000:.1f} | {xs[0] * 1000:.1f} | "
            f"{p90 * 1000:.1f} | {'' if cpu is None else f'{cpu * 1000:.1f}'} |")


def docker_rows(runs: int) -> list[str]:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode:
        return ["| docker CLI | (docker/dockerd not installed on this machine) | | | |"]
    out = []
    swarm = subprocess.run([docker, "service", "ls"], capture_output=True).returncode == 0
    for argv in ([[docker, "service", "ls"]] if swarm else
                 [[docker, "ps"], [docker, "version"]]):
        out.append(row(" ".join(["docker", *argv[1:]]), timed(argv, runs)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--compare", default="", metavar="SHOAL",
                    help="also time another shoal executable (e.g. the previous release's "
                    "venv/bin/shoal) against the same agent")
    args = ap.parse_args()
    shoal = str(shoal_bin())
    venv_python = str(Path(shoal).parent / "python")
    rows = [row("`python3 -c pass` (system)", timed(["python3", "-c", "pass"], args.runs)),
            row("`python -c pass` (venv, editable install)",
                timed([venv_python, "-c", "pass"], args.runs))]
    with Lab(1) as lab:
        lab.form_cluster(managers=1)
        h = lab.hosts[0]
        c = Client(f"unix://{h.sock}")
        for i in range(args.services):
            h.cli("service", "create", "-d", "--name", f"s{i}", "--replicas",
                  str(args.replicas), "--", "sleep", "100000")
        wait_until(lambda: all(s["running"] == s["replicas"]
                               for s in c.call("GET", "/v1/services")) or None,
                   timeout=120, what="every task running")
        base = [shoal, "-H", f"unix://{h.sock}"]
        for extra in (["service", "ls"], ["service", "ps", "s0"], ["service", "inspect", "s0"],
                      ["--stale", "service", "ls"]):
            rows.append(row(f"`shoal {' '.join(extra)}`", timed([*base, *extra], args.runs)))
            if args.compare:
                rows.append(row(f"before: `shoal {' '.join(extra)}`",
                                timed([args.compare, "-H", f"unix://{h.sock}", *extra],
                                      args.runs)))
        for who, exe, flags in (("", shoal, ["-d"]), ("before: ", args.compare, [])):
            if not exe:
                continue
            creates, cpu = [], []
            for i in range(args.runs):
                c0, t0 = _cpu(), time.perf_counter()
                subprocess.run([exe, "-H", f"unix://{h.sock}", "service", "create", *flags,
                                "--name", f"c{i}{who[:1]}", "--", "sleep", "100000"],
                               check=True, stdout=subprocess.DEVNULL)
                creates.append(time.perf_counter() - t0)
                cpu.append(_cpu() - c0)
            CPU[id(creates)] = statistics.median(cpu)
            rows.append(row(f"{who}`shoal service create{' -d' if flags else ''}`", creates))
    rows += docker_rows(args.runs)
    print(f"{args.runs} runs each; {args.services} services x {args.replicas} tasks; "
          f"load {os.getloadavg()[0]:.1f} at the end; {os.cpu_count()} cpus")
    print("| command | median ms | min ms | p90 ms | CPU ms (median) |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
