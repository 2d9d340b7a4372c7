"""What one wake-up of an idle thread costs on this machine, by how long it slept.

    .venv/bin/python bench/wake_cost.py [--wakes 40] [--core N]

Why: an idle shoal agent does almost nothing per wake-up (a Raft heartbeat, a gossip ping),
so its idle CPU is (wake-ups per second) x (cost of one wake-up), and the second factor is a
property of the machine: on a virtual machine a vCPU that has gone idle must be woken by the
hypervisor, and the thread that runs first pays for it. This prints that cost, so idle
figures from different machines (or days) can be compared, and so a change can be judged by
the wake-ups it saves.

What it measures, for each sleep length: a Python thread blocks in ``epoll`` and is woken
(a) by its timeout ("timer"), (b) by a datagram another process sends ("packet"), and (c) by
its timeout while a second thread of the same process wakes every millisecond ("timer, busy
sibling": the vCPU never goes idle). The cost of a wake-up is the thread's CPU time from just
before the ``epoll`` call to just after it (``/proc/thread-self/schedstat``, nanoseconds: the
scheduler's own accounting, not the 4 ms tick); the median of ``--wakes`` wake-ups is printed.
The sender (b) and the busy sibling (c) load the machine very little (one wake-up per period
and ~1,000 per second); everything runs on ``--core`` if given (taskset-style affinity of
this process and its child), else wherever the kernel puts it (printed).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import threading
import time

SLEEPS = (0.001, 0.01, 0.05, 0.2, 1.0)


def _runtime() -> int:
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[0])


def timer_wakes(sleep: float, wakes: int) -> list[float]:
    """Costs (µs) of ``wakes`` epoll timeouts of ``sleep`` seconds."""
    poll = select.epoll()
    out = []
    try:
        for _ in range(wakes):
            before = _runtime()
            poll.poll(sleep)
            out.append((_runtime() - before) / 1e3)
    finally:
        poll.close()
    return out


def packet_wakes(sleep: float, wakes: int) -> list[float]:
    """Costs (µs) of ``wakes`` wake-ups by a datagram sent every ``sleep`` s by a child."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:  # the sender
        mine.close()
        try:
            for _ in range(wakes + 1):
                time.sleep(sleep)
                theirs.send(b"x")
        finally:
            os._exit(0)
    theirs.close()
    poll = select.epoll()
    poll.register(mine.fileno(), select.EPOLLIN)
    out = []
    try:
        mine.recv(16)  # (the first: its sleep may overlap the fork)
        for _ in range(wakes):
            before = _runtime()
            poll.poll(sleep * 10 + 1)
            out.append((_runtime() - before) / 1e3)
            mine.recv(16)
    finally:
        poll.close()
        mine.close()
        os.waitpid(pid, 0)
    return out


def with_busy_sibling(sleep: float, wakes: int) -> list[float]:
    stop = threading.Event()

    def busy() -> None:
        poll = select.epoll()
        while not stop.is_set():
            poll.poll(0.001)
        poll.close()

    sibling = threading.Thread(target=busy, daemon=True)
    sibling.start()
    try:
        return timer_wakes(sleep, wakes)
    finally:
        stop.set()
        sibling.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wakes", type=int, default=40, help="wake-ups per figure (default 40)")
    ap.add_argument("--core", type=int, default=None, help="run everything on this core")
    args = ap.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    print(f"{os.cpu_count()} cores; this process (and its sender child) may run on: {cores}")
    print(f"median cost of one wake-up, µs of the woken thread's CPU ({args.wakes} wake-ups "
          "each)")
    print(f"{'slept':>8} {'timer':>8} {'packet':>8} {'timer, busy sibling':>20}")
    for sleep in SLEEPS:
        wakes = max(5, min(args.wakes, int(20 / sleep)))
        row = [statistics.median(f(sleep, wakes)) for f in
               (timer_wakes, packet_wakes, with_busy_sibling)]
        print(f"{sleep * 1000:>6g}ms {row[0]:>8.0f} {row[1]:>8.0f} {row[2]:>20.0f}",
              flush=True)


if __name__ == "__main__":
    main()
