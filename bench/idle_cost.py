"""Idle cost of agents: CPU % of a core and RSS per agent, in a cluster doing nothing.

    .venv/bin/python bench/idle_cost.py [--managers 3] [--workers 2] [--window 60] [--settle 10]
                                        [--threads] [--smaps] [--pyspy DIR [--pyspy-seconds 20]]
                                        [--restart]

Builds netns hosts (tests/netlab.py), forms the cluster with the agents' default (LAN)
settings, waits ``--settle`` seconds, then reads each agent process's CPU time (utime+stime
from /proc/PID/stat, its threads included: pysyncobj's tick thread, the gossip thread) and
RSS at the start and end of a ``--window`` second window in which nothing is asked of the
cluster. Prints one line per agent (role, leader or not) and the median per role. The agents
run on whichever of the machine's cores the kernel picks; nothing else of shoal runs (the
script only sleeps during the window).

``--restart``: once the cluster is formed, restart every agent (SIGTERM, one at a time, then
wait until all are ready again) and measure those: agents as they run after an upgrade or a
reboot, not fresh from ``init``/``join`` — creating the CA, signing and checking certificates
import cryptography.x509 (~1.9 MiB), which a restarted agent never loads (node/pki.py).

``--threads``: also per thread of each agent (named from ``py-spy dump`` when py-spy is there):
its CPU % and context switches per second over the window — what each thread costs and how
often it wakes.

``--pyspy DIR``: after the window, sample every agent with py-spy (on PATH or next to this
Python; ``pip install py-spy``) for ``--pyspy-seconds`` at 100 Hz, running threads only, and
write DIR/HOST-ROLE.txt: the collapsed stacks and, first, the functions most often on top
of a stack (self) and anywhere in one (total), as % of one core. Sampling pauses the
process, so the profile is taken after (not during) the measured window.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import multiplier_args

from netlab import Host, Lab, wait_until

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def threads(pid: int) -> dict[int, tuple[float, int]]:
    """Per thread of ``pid``: (CPU seconds, voluntary + involuntary context switches)."""
    out: dict[int, tuple[float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches" in line)
        out[int(task.name)] = ((int(fields[11]) + int(fields[12])) / TICK, switches)
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from ``py-spy dump`` (empty without py-spy)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return {}
    out = subprocess.run([exe, "dump", "-p", str(pid)], capture_output=True, text=True)
    names: dict[int, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r'Thread (0x[0-9A-Fa-f]+|\d+) \(\w+\): "([^"]*)"', line)
        if m:
            tid = int(m.group(1), 0)
            names[tid] = m.group(2)
    return names


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / (1 << 20)


def rss_breakdown(pid: int, top: int = 6) -> str:
    """Where ``pid``'s RSS is, from /proc/PID/smaps: the heap, anonymous mappings (obmalloc's
    arenas, thread stacks, glibc's per-thread malloc arenas: 64 MiB reservations) and the
    files mapped, largest first, in MiB."""
    rss: collections.Counter[str] = collections.Counter()
    big_anon = 0
    name = "[anon]"
    size_kib = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            size_kib = (end - start) >> 10
            parts = line.split()
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            if name == "[anon]" and size_kib >= 32 << 10:
                name, big_anon = "[anon ≥32 MiB: malloc arenas]", big_anon + 1
            rss[name] += kib
    nthreads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    parts = [f"{k} {v / 1024:.1f}" for k, v in rss.most_common(top)]
    return f"{nthreads} threads, {big_anon} malloc arena maps; " + ", ".join(parts)


def pyspy_summary(raw: str, seconds: float, rate: int, top: int = 25) -> str:
    """The collapsed stacks of ``py-spy record -f raw`` as self/total % of one core."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
                  for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    per = 100.0 / (seconds * rate)
    out = [f"{samples} samples in {seconds:.0f} s at {rate} Hz = {samples * per:.2f} % of a "
           "core (running threads)"]
    for name, table in (("self", own), ("total", total)):
        out.append(f"  {name}:")
        out += [f"    {c * per:6.2f} %  {f}" for f, c in table.most_common(top)]
    return "\n".join(out)


def pyspy(pid: int, out: Path, seconds: float, rate: int = 100) -> None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = out.with_suffix(".raw")
    subprocess.run([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate),
                    "-f", "raw", "-o", str(raw)], check=True, capture_output=True)
    out.write_text(pyspy_summary(raw.read_text(), seconds, rate) + "\n\n" + raw.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--managers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--threads", action="store_true",
                    help="also per thread: CPU and context switches per second")
    ap.add_argument("--pyspy", type=Path, default=None, help="profile dir (see above)")
    ap.add_argument("--pyspy-seconds", type=float, default=20.0)
    ap.add_argument("--restart", action="store_true",
                    help="restart every agent once the cluster formed, and measure those")
    ap.add_argument("--smaps", action="store_true",
                    help="also where each agent's RSS is (heap, anonymous maps, libraries)")
    ap.add_argument("--raft-multiplier", type=float, default=1.0,
                    help="the agents' --raft-multiplier (default 1)")
    args = ap.parse_args()
    n = args.managers + args.workers
    with Lab(n, agent_args=multiplier_args(args.raft_multiplier)) as lab:
        lab.form_cluster(managers=args.managers, workers=args.workers, timeout=120)
        if args.restart:
            for h in lab.hosts[:n]:
                h.restart_agent(signal.SIGTERM, timeout=60)
            wait_until(lambda: sum(x.get("state") == "ready"
                                   for x in lab.hosts[0].cli_json("node", "ls")) == n,
                       timeout=120, interval=0.5, what=f"{n} nodes ready after the restarts")
        time.sleep(args.settle)
        nodes = lab.hosts[0].cli_json("node", "ls")
        role = {x["addr"]: ("leader" if x["manager_status"] == "leader" else x["role"])
                for x in nodes}
        hosts: list[tuple[Host, int]] = []
        for h in lab.hosts:
            pid = h.agent_pid
            assert pid is not None
            hosts.append((h, pid))
        start = {pid: cpu_seconds(pid) for _, pid in hosts}
        start_threads = {pid: threads(pid) for _, pid in hosts}
        t0 = time.monotonic()
        time.sleep(args.window)
        took = time.monotonic() - t0
        per_role: dict[str, list[float]] = {}
        print(f"idle window {took:.1f} s, {args.managers} managers + {args.workers} workers")
        for h, pid in hosts:
            pct = 100.0 * (cpu_seconds(pid) - start[pid]) / took
            r = role.get(h.ip, "?")
            per_role.setdefault("manager" if r == "leader" else r, []).append(pct)
            print(f"  {h.name} {r:8} cpu {pct:5.2f} % of a core  rss {rss_mib(pid):6.1f} MiB")
            if args.smaps:
                print(f"      {rss_breakdown(pid)}")
            if args.threads:
                names = thread_names(pid)
                before = start_threads[pid]
                for tid, (cpu, sw) in sorted(threads(pid).items()):
                    cpu0, sw0 = before.get(tid, (0.0, 0))
                    print(f"      thread {tid} {names.get(tid, '?')[:24]:24} "
                          f"cpu {100 * (cpu - cpu0) / took:5.2f} %  "
                          f"{(sw - sw0) / took:6.1f} wakeups/s")
        for r, vals in sorted(per_role.items()):
            print(f"median {r}: {statistics.median(vals):.2f} % of a core (n={len(vals)})")
        if args.pyspy is not None:
            args.pyspy.mkdir(parents=True, exist_ok=True)
            for h, pid in hosts:
                out = args.pyspy / f"{h.name}-{role.get(h.ip, 'x')}.txt"
                pyspy(pid, out, args.pyspy_seconds)
                print(f"profile: {out}", flush=True)


if __name__ == "__main__":
    main()
