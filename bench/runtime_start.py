"""Runtime-only task start benchmark (needs root): prints figures, never passes or fails.

Measures, in one run on this machine:

1. start latency: ``ProcessController.start()`` -> RUNNING for a ``sleep`` task in the default
   image (namespaces, cgroups, read-only host rootfs, /proc, /dev, caps, tini), interleaved
   with a raw ``unshare --fork --pid --mount-proc --uts --ipc --net true`` exec (start to exit)
   and with the same task on the host's network (``host_network``: no network namespace
   cloned, lo left alone — what ``--network host`` saves per start) and unconfined (no
   seccomp filter: what installing Docker's default profile costs a start; the program is
   compiled once, cached);
2. throughput: tasks started per second with ``--concurrency`` starts in flight, own network
   namespace and host network one after the other;
3. the controller process's RSS with ``--tasks`` tasks running (the agent-side cost).

    .venv/bin/python bench/runtime_start.py [--samples 50] [--tasks 100] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import time
from pathlib import Path

import benchrt  # (bench/ is on sys.path)

from shoal.runtime.records import RunState, TaskConfig

RAW = ["unshare", "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net", "true"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _summary(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"{name:<34} median {statistics.median(ms):6.2f} ms   p90 "
            f"{ms[int(len(ms) * 0.9)]:6.2f} ms   min {ms[0]:6.2f} ms   (n={len(ms)})")


def _cfg(i: int, prefix: str, host_network: bool = False, seccomp: str = "") -> TaskConfig:
    return TaskConfig(f"{prefix}{i}", f"bench-{i}", ("sleep", "100000"), {},
                      host_network=host_network, seccomp=seccomp)


async def main(args: argparse.Namespace) -> None:
    rss0 = _rss_mb()
    async with benchrt.controller("shoal-bench-rt-") as (ctl, _data):
        rss_ctl = _rss_mb()
        # warm-up (page cache, the launcher binary, cgroup parents)
        for i in range(3):
            await ctl.start(_cfg(i, "warm"))
            subprocess.run(RAW, check=True)
        for i in range(3):
            await ctl.remove(f"warm{i}")

        runtime_ms, raw_ms, host_ms, free_ms = [], [], [], []
        for i in range(args.samples):
            t0 = time.perf_counter()
            subprocess.run(RAW, check=True)
            raw_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            st = await ctl.start(_cfg(i, "lat"))
            runtime_ms.append((time.perf_counter() - t0) * 1000)
            assert st.state is RunState.RUNNING, st
            await ctl.remove(f"lat{i}")
            t0 = time.perf_counter()
            st = await ctl.start(_cfg(i, "hlat", host_network=True))
            host_ms.append((time.perf_counter() - t0) * 1000)
            assert st.state is RunState.RUNNING, st
            await ctl.remove(f"hlat{i}")
            t0 = time.perf_counter()
            st = await ctl.start(_cfg(i, "ulat", seccomp="unconfined"))
            free_ms.append((time.perf_counter() - t0) * 1000)
            assert st.state is RunState.RUNNING, st
            await ctl.remove(f"ulat{i}")
        ratio = statistics.median(runtime_ms) / statistics.median(raw_ms)
        print(_summary("raw unshare exec (start to exit)", raw_ms))
        print(_summary("runtime start() -> RUNNING", runtime_ms))
        print(_summary("  the same, host network", host_ms))
        print(_summary("  the same, no seccomp filter", free_ms))
        print(f"{'ratio runtime / raw (medians)':<34} {ratio:.2f}x")

        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int, prefix: str, host_network: bool) -> None:
            async with sem:
                st = await ctl.start(_cfg(i, prefix, host_network))
                assert st.state is RunState.RUNNING, st

        for prefix, host_network, what in (("hp", True, "throughput, host network"),
                                           ("tp", False, "throughput")):
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i, prefix, host_network) for i in range(args.tasks)))
            elapsed = time.perf_counter() - t0
            print(f"{what:<34} {args.tasks / elapsed:6.1f} starts/s "
                  f"({args.tasks} tasks, {args.concurrency} in flight, {elapsed:.2f} s)")
            if host_network:
                await asyncio.gather(*(ctl.remove(f"hp{i}") for i in range(args.tasks)))
        await asyncio.sleep(0.5)
        rss = _rss_mb()
        print(f"{'controller RSS':<34} {rss:6.1f} MB with {len(ctl.tasks())} tasks running "
              f"(interpreter alone {rss0:.1f} MB, controller idle {rss_ctl:.1f} MB, peak "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB)")
        t0 = time.perf_counter()
        await asyncio.gather(*(ctl.remove(f"tp{i}") for i in range(args.tasks)))
        print(f"{'remove (stop + cgroups + dir)':<34} "
              f"{(time.perf_counter() - t0) * 1000 / args.tasks:6.2f} ms per task (concurrent)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
