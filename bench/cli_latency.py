"""CLI responsiveness: `shoal service ls|ps|inspect` and `service create -d`, end to end.

    .venv/bin/python bench/cli_latency.py [--runs 20] [--services 10] [--replicas 3]
        [--managers 1] [--wheel] [--compare SHOAL] [--cli-cpu N] [--agent-cpu N]

One netns host (tests/netlab.py) runs a one-node cluster (``--managers 3``: three managers,
the CLI on the leader, and the requests' server time is also measured on a follower) with
``--services`` services of ``--replicas`` sleeping tasks each. Each command is run
``--runs`` times (after two untimed runs) as a new process from the root namespace against
the agent's unix socket, as a script calling the CLI in a loop does; the figures are that
process's wall time from spawn to exit (time.perf_counter around subprocess.run) and its CPU
time (user + sys, getrusage of the children). The CLI's processes run on ``--cli-cpu`` (this
script pins itself there; its children inherit it) and the agent's threads on
``--agent-cpu``, so that which core runs what is known; on a 2-core machine shared with other
work neither core is quiet, which the load average printed with the figures tells.

Side by side, the floor any Python CLI pays: ``python3 -c pass`` for the system's python3
(/usr/bin/python3), the one on PATH (when it is another), this venv's python (which also
runs the editable install's import hook from a .pth file, ~13 ms: it imports pathlib,
importlib.util, urllib.parse, re), and with ``--wheel`` a venv with shoal installed from a
wheel (``pip install --no-deps .``, byte-compiled by pip) as a user has it, and that
install's ``shoal``. The docker CLI against dockerd is timed when both are present.

Child processes run with their byte code cached as an installed shoal has it: without
PYTHONDONTWRITEBYTECODE (when the environment sets it, an editable install recompiles every
module of the CLI on every run) and with PYTHONPYCACHEPREFIX in a temporary directory (so
that no tree, this one's or --compare's, gets __pycache__ directories written into it; the
untimed first runs fill it). The server's share is measured apart: the same GETs sent from this
process (no interpreter start) with and without ``?stale=1``, i.e. with and without the
Raft read barrier a default read commits. The import set of `service ls|ps|inspect` is
checked by tests/test_cli_shape.py, never its time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import REPO, Host, Lab, shoal_bin, wait_until
from shoal.cli.main import Client

CPU: dict[int, float] = {}  # id(wall list) → the runs' median CPU seconds (user + sys)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # (see above)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv: Sequence[str], runs: int, warmup: int = 2) -> list[float]:
    """Wall seconds of each run (spawn to exit); their CPU time goes to CPU."""
    out, cpu = [], []
    for i in range(warmup + runs):
        c0, t0 = _cpu(), time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=ENV)
        if i >= warmup:
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


def floor_rows(runs: int, venv_python: str, wheel_python: str) -> list[str]:
    rows = []
    system = Path("/usr/bin/python3")
    on_path = shutil.which("python3") or ""
    if system.exists():
        rows.append(row("`python3 -c pass` (system: /usr/bin/python3)",
                        timed([str(system), "-c", "pass"], runs)))
    if on_path and Path(on_path).resolve() != system.resolve():
        rows.append(row(f"`python3 -c pass` (on PATH: {on_path})",
                        timed([on_path, "-c", "pass"], runs)))
    rows.append(row("`python -c pass` (this venv: editable install's hook)",
                    timed([venv_python, "-c", "pass"], runs)))
    if wheel_python:
        rows.append(row("`python -c pass` (venv with shoal from a wheel)",
                        timed([wheel_python, "-c", "pass"], runs)))
    return rows


def make_wheel_venv(where: Path) -> Path:
    """A venv with shoal installed from a wheel (no dependencies: the commands timed here
    need none), byte-compiled by pip as an install is. Returns its ``shoal``."""
    python = shutil.which("python3", path=os.path.dirname(os.path.realpath(sys.executable)))
    subprocess.run([python or sys.executable, "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin" / "pip"), "install", "--quiet", "--no-deps",
                    str(REPO)], check=True, env=ENV, stderr=subprocess.DEVNULL)
    return where / "bin" / "shoal"


def pin(pid: int, cpu: int) -> int:
    """Every thread of ``pid`` onto ``cpu``; returns how many."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # (a thread that ended)
            os.sched_setaffinity(tid, {cpu})
    return len(tids)


def server_rows(hosts: list[tuple[str, Host]], runs: int) -> list[str]:
    """The server's share: each GET sent 5 x ``runs`` times from this process, median."""
    rows = []
    for who, h in hosts:
        c = Client(f"unix://{h.sock}")
        for path in ("/v1/services", "/v1/services/s0/tasks", "/v1/services/s0"):
            for stale in ("", "?stale=1"):
                xs = []
                for _ in range(runs * 5):
                    t0 = time.perf_counter()
                    c.call("GET", path + stale)
                    xs.append(time.perf_counter() - t0)
                rows.append(row(f"server: `GET {path}{stale}` ({who}; from a running "
                                "process)", xs))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--managers", type=int, default=1)
    ap.add_argument("--wheel", action="store_true",
                    help="also time shoal installed from a wheel in a temporary venv")
    ap.add_argument("--compare", default="", metavar="SHOAL",
                    help="also time another shoal executable (e.g. the previous release's "
                    "venv/bin/shoal) against the same agent")
    ncpu = os.cpu_count() or 1
    ap.add_argument("--cli-cpu", type=int, default=ncpu - 1)
    ap.add_argument("--agent-cpu", type=int, default=0)
    args = ap.parse_args()
    shoal = str(shoal_bin())
    venv_python = str(Path(shoal).parent / "python")
    with tempfile.TemporaryDirectory(prefix="shoal-cli-bench-") as tmp:
        ENV["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        wheel_shoal = str(make_wheel_venv(Path(tmp) / "venv")) if args.wheel else ""
        wheel_python = str(Path(wheel_shoal).parent / "python") if wheel_shoal else ""
        with Lab(args.managers) as lab:
            rows, who = run_lab(lab, args, shoal, venv_python, wheel_shoal, wheel_python)
    print(f"{args.runs} runs each; {args.services} services x {args.replicas} tasks; "
          f"{args.managers} manager(s); {who}; Python {platform.python_version()}; "
          f"load {os.getloadavg()[0]:.1f} at the end; {ncpu} cpus")
    print("| command | median ms | min ms | p90 ms | CPU ms (median) |\n|---|---|---|---|---|")
    print("\n".join(rows))


def run_lab(lab: Lab, args: argparse.Namespace, shoal: str, venv_python: str,
            wheel_shoal: str, wheel_python: str) -> tuple[list[str], str]:
    lab.form_cluster(managers=args.managers)
    h = lab.hosts[0]
    c = Client(f"unix://{h.sock}")
    for i in range(args.services):
        h.cli("service", "create", "-d", "--name", f"s{i}", "--replicas",
              str(args.replicas), "--", "sleep", "100000")
    wait_until(lambda: all(s["running"] == s["replicas"]
                           for s in c.call("GET", "/v1/services")) or None,
               timeout=120, what="every task running")
    threads = sum(pin(x.agent_pid, args.agent_cpu) for x in lab.hosts if x.agent_pid)
    os.sched_setaffinity(0, {args.cli_cpu})  # (the CLI's processes inherit it)
    who = (f"CLI processes on cpu {args.cli_cpu}, the agents' {threads} threads on cpu "
           f"{args.agent_cpu}")
    rows = floor_rows(args.runs, venv_python, wheel_python)
    exes: list[tuple[str, str]] = [("", shoal)]
    if wheel_shoal:
        exes.append(("wheel: ", wheel_shoal))
    if args.compare:
        exes.append(("before: ", args.compare))
    for extra in (["service", "ls"], ["service", "ps", "s0"], ["service", "inspect", "s0"],
                  ["--stale", "service", "ls"]):
        for label, exe in exes:
            rows.append(row(f"{label}`shoal {' '.join(extra)}`",
                            timed([exe, "-H", f"unix://{h.sock}", *extra], args.runs)))
    for label, exe in exes:
        if label == "wheel: ":
            continue  # (installed without dependencies: create needs msgspec)
        creates: list[float] = []
        cpu: list[float] = []
        for i in range(args.runs):
            c0, t0 = _cpu(), time.perf_counter()
            subprocess.run([exe, "-H", f"unix://{h.sock}", "service", "create", "-d",
                            "--name", f"c{i}{label[:1]}", "--", "sleep", "100000"],
                           check=True, stdout=subprocess.DEVNULL, env=ENV)
            creates.append(time.perf_counter() - t0)
            cpu.append(_cpu() - c0)
        CPU[id(creates)] = statistics.median(cpu)
        rows.append(row(f"{label}`shoal service create -d`", creates))
    servers = [("leader", h)] + [("follower", x) for x in lab.hosts[1:args.managers][:1]]
    rows += server_rows(servers, args.runs)
    rows += docker_rows(args.runs)
    return rows, who


if __name__ == "__main__":
    main()
