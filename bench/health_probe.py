"""Health-probe cost benchmark (needs root): prints figures, never passes or fails.

N "tasks" run on this node, each in its own network, mount, pid, uts and ipc namespaces
(``unshare``), each a ``busybox httpd`` on 127.0.0.1:8000 inside its namespace, pinned to
the second core. The agent's ``HealthMonitor`` (node/health.py, the real probes, uvloop as the
agent runs) is pinned to the first core and checks all N tasks every ``--interval`` seconds
for ``--seconds``, once per kind:

* ``http``: GET /health from inside the task's netns (socket made via setns on a thread);
* ``tcp``:  connect to port 8000 from inside the netns;
* ``exec``: ``/bin/sh -c true`` through the agent's exec path (a host shell joins the task's
  cgroups, nsenter into its namespaces, root, uid/gid);
* ``nsenter``: baseline, a raw ``nsenter -t PID -n -m -p true`` per probe (what any
  exec-based check costs at least, e.g. Docker's exec would add containerd/runc on top).

CPU per probe = (agent process CPU + CPU of the probe processes it spawned and reaped) /
probes. The tasks' own CPU (busybox answering) is not counted: busybox httpd forks per
connection and ignores SIGCHLD, so its children's CPU is not accounted to it.
The bench's own tasks share the bench's cgroup, so joining "the task's cgroup" writes into
the cgroup the probe is already in (the cost of the write is measured, nothing is moved).

    .venv/bin/python bench/health_probe.py [--tasks 100] [--interval 1] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from shoal.node.health import Check, HealthConfig, HealthMonitor, Probes
from shoal.raft.models import HealthResult

AGENT_CORE, TASK_CORE = 0, 1


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def start_tasks(n: int, root: Path) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """N busybox httpd in fresh namespaces; returns the unshare processes and the httpd pids
    (as the host sees them: the processes to nsenter into)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    www = root / "www"
    www.mkdir()
    (www / "health").write_text("ok\n")
    procs, pids = [], []
    for _ in range(n):
        script = (f"ip link set lo up && exec taskset -c {TASK_CORE} {busybox} httpd -f "
                  f"-p 127.0.0.1:8000 -h {www}")
        p = subprocess.Popen(["unshare", "--net", "--mount", "--pid", "--uts", "--ipc",
                              "--fork", "--mount-proc", "sh", "-c", script],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
    deadline = time.monotonic() + 30
    for p in procs:
        while True:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "busybox":
                pids.append(int(kids[0]))
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tasks did not start")
            time.sleep(0.01)
    return procs, pids


async def raw_nsenter(check: Check, pid: int) -> HealthResult:
    start = time.time()
    proc = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(pid), "-n", "-m", "-p", "true", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    code = await proc.wait()
    return HealthResult(start=start, end=time.time(), exit_code=code)


async def run_kind(kind: str, pids: list[int], interval: float, seconds: float
                   ) -> tuple[int, int, float, float]:
    """(probes, failures, agent CPU s, children CPU s) of one kind."""
    cfg = HealthConfig(log_refresh=3600.0)
    probes = Probes(cfg)
    counts = {"probes": 0, "failed": 0}

    async def counting(check: Check, pid: int) -> HealthResult:
        r = await (raw_nsenter(check, pid) if kind == "nsenter" else probes(check, pid))
        counts["probes"] += 1
        counts["failed"] += r.exit_code != 0
        return r

    check = {"http": Check(kind="http", port=8000, path="/health"),
             "tcp": Check(kind="tcp", port=8000),
             "exec": Check(kind="exec", argv=("/bin/sh", "-c", "true")),
             "nsenter": Check(kind="exec", argv=("true",))}[kind]
    check = Check(**{**check.__dict__, "interval": interval, "timeout": 10.0,
                     "retries": 1_000_000})
    monitor = HealthMonitor(cfg, prober=counting)
    # spread the first probes over one interval, as tasks started at different times are
    for i, pid in enumerate(pids):
        asyncio.get_running_loop().call_later(
            interval * i / len(pids), monitor.watch, f"t{i}", check, pid, time.time())
    await asyncio.sleep(interval)  # warm up: every task probed once
    a0, c0, n0 = _cpu_self(), _cpu_children(), counts["probes"]
    f0 = counts["failed"]
    await asyncio.sleep(seconds)
    a1, c1, n1 = _cpu_self(), _cpu_children(), counts["probes"]
    monitor.close()
    await asyncio.sleep(0.5)
    return n1 - n0, counts["failed"] - f0, a1 - a0, c1 - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--kinds", default="http,tcp,exec,nsenter")
    args = ap.parse_args()
    os.sched_setaffinity(0, {AGENT_CORE})
    with tempfile.TemporaryDirectory(prefix="shoal-hcbench-") as tmp:
        procs, pids = start_tasks(args.tasks, Path(tmp))
        try:
            print(f"{args.tasks} tasks (busybox httpd, own namespaces) on core {TASK_CORE}; "
                  f"agent-side probing on core {AGENT_CORE}; interval {args.interval:g}s, "
                  f"{args.seconds:g}s measured per kind")
            print(f"{'kind':8} {'probes':>7} {'failed':>6} {'agent ms/probe':>15} "
                  f"{'spawned ms/probe':>17} {'total ms/probe':>15} {'% of a core':>12}")
            try:
                import uvloop
                run = uvloop.run
            except ImportError:  # pragma: no cover
                run = asyncio.run
            for kind in args.kinds.split(","):
                n, failed, agent, spawned = run(
                    run_kind(kind, pids, args.interval, args.seconds))
                per = 1000 / max(n, 1)
                print(f"{kind:8} {n:7d} {failed:6d} {agent * per:15.3f} {spawned * per:17.3f} "
                      f"{(agent + spawned) * per:15.3f} "
                      f"{100 * (agent + spawned) / args.seconds:11.1f}%")
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
            for p in procs:
                p.wait()


if __name__ == "__main__":
    main()
