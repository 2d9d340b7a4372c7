"""Benchmark of shoal.gossip: failure detection time, false positives, bandwidth.

Prints figures; never passes or fails. Run from the repository root::

    .venv/bin/python bench/gossip_bench.py            # full (about a minute and a half)
    .venv/bin/python bench/gossip_bench.py --quick    # fewer runs

1. In-memory simulation, 50 members (virtual time): kill -> every member marks it dead,
   median over several seeds, for Config.lan() and Config.local(). Simulated seconds.
2. Simulation, 50 members, 10 % packet loss, 10 simulated minutes per seed: false deaths,
   false suspicions, refutations; bytes/s sent per member with and without loss.
3. Real UDP on loopback, 10 processes (``python -m shoal.gossip``, uvloop, AES-GCM,
   Config.local()): SIGKILL -> every other process marks it dead, median over several kills
   (the victim is restarted on the same port between runs); bytes/s sent per member.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shoal.gossip import Config, MemberState
from shoal.gossip.proctest import ProcessCluster
from shoal.gossip.simloop import run_simulation
from shoal.gossip.testing import SimCluster


def _fmt(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.2f} s  min {min(values):6.2f}  "
        f"max {max(values):6.2f}  (n={len(values)})"
    )


def sim_detection(preset: str, seeds: list[int], n: int = 50) -> None:
    cfg = Config.lan() if preset == "lan" else Config.local()
    times: list[float] = []
    wall: list[float] = []

    async def one(seed: int) -> float:
        cluster = SimCluster(n, cfg, seed=seed)
        await cluster.start()
        await cluster.run_for(20 * cfg.probe_interval)
        victim = random.Random(seed).choice(sorted(cluster.members)[1:])
        await cluster.crash(victim)
        took = await cluster.wait_until(
            lambda: cluster.all_see(victim, MemberState.DEAD), cfg.detection_bound(n) * 3, 0.01
        )
        await cluster.shutdown()
        return took

    for seed in seeds:
        t0 = time.perf_counter()
        times.append(run_simulation(one(seed)))
        wall.append(time.perf_counter() - t0)
    print(
        f"  sim {n} members, Config.{preset}(): kill -> dead everywhere  {_fmt(times)}"
        f"   [bound {cfg.detection_bound(n):.1f} s; wall {statistics.mean(wall):.2f} s/run]"
    )


def sim_loss(seeds: list[int], minutes: float, n: int = 50, loss: float = 0.10) -> None:
    cfg = Config.lan()
    seconds = minutes * 60

    async def one(seed: int, loss_rate: float) -> dict[str, float]:
        cluster = SimCluster(n, cfg, seed=seed)
        await cluster.start()
        await cluster.run_for(10)
        cluster.net.loss = loss_rate
        start = asyncio.get_running_loop().time()
        before = cluster.total_stats().get("bytes_out", 0)
        await cluster.run_for(seconds)
        stats = cluster.total_stats()
        out = {
            "dead": float(len(cluster.events_of_kind("dead", since=start))),
            "suspicions": float(stats.get("suspicions", 0)) / (n - 1),
            "refutes": float(stats.get("refutes", 0)),
            "bytes_per_member_s": (stats.get("bytes_out", 0) - before) / n / seconds,
        }
        await cluster.shutdown()
        return out

    for loss_rate in (0.0, loss):
        rows = []
        t0 = time.perf_counter()
        for seed in seeds:
            rows.append(run_simulation(one(seed, loss_rate)))
        wall = (time.perf_counter() - t0) / len(seeds)
        dead = sum(r["dead"] for r in rows)
        print(
            f"  sim {n} members, Config.lan(), {loss_rate:.0%} loss, {minutes:g} min x "
            f"{len(seeds)} seeds: false deaths {dead:g}, false suspicions "
            f"{statistics.mean(r['suspicions'] for r in rows):.1f}/run, refutations "
            f"{statistics.mean(r['refutes'] for r in rows):.1f}/run, sent "
            f"{statistics.mean(r['bytes_per_member_s'] for r in rows):.0f} B/s per member"
            f"   [wall {wall:.1f} s/run]"
        )


def udp_processes(runs: int, n: int = 10) -> None:
    cfg = Config.local()
    with tempfile.TemporaryDirectory(prefix="shoal-gossip-bench-") as tmp:
        cluster = ProcessCluster(Path(tmp))
        try:
            t0 = time.monotonic()
            cluster.start(n)
            print(f"  udp {n} processes: started and converged in {time.monotonic() - t0:.2f} s")
            times: list[float] = []
            for run in range(runs):
                victim = f"p{1 + run % (n - 1)}"
                port = cluster.procs[victim].port
                cluster.wait_for(cluster.converged, 30, "convergence")
                killed = cluster.kill(victim)
                cluster.wait_for(lambda v=victim: cluster.all_see(v, "dead"), 60, "detection")
                dead = cluster.events_about(victim, "dead", killed)
                times.append(max(e["_at"] for e in dead) - killed)
                cluster.spawn(victim, [cluster.procs["p0"].address], port=port)
                cluster.wait_for(cluster.converged, 30, "rejoin")
            print(
                f"  udp {n} processes, Config.local(): SIGKILL -> dead everywhere  {_fmt(times)}"
                f"   [bound {cfg.detection_bound(n):.1f} s]"
            )
            # bandwidth: stats snapshots 5 s apart
            for name in cluster.running():
                cluster.signal(name, signal.SIGUSR1)
            time.sleep(0.3)
            first = cluster.last_stats()
            t1 = time.monotonic()
            time.sleep(5.0)
            for name in cluster.running():
                cluster.signal(name, signal.SIGUSR1)
            time.sleep(0.3)
            second = cluster.last_stats()
            dt = time.monotonic() - t1
            rates = [
                (second[k].get("bytes_out", 0) - first[k].get("bytes_out", 0)) / dt
                for k in second
                if k in first
            ]
            print(
                f"  udp {n} processes, idle: sent {statistics.mean(rates):.0f} B/s per member "
                f"(probe every {cfg.probe_interval} s)"
            )
        finally:
            cluster.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    seeds = list(range(1, 4 if args.quick else 8))
    print("shoal.gossip benchmark")
    print("1. detection time, in-memory simulation (simulated seconds)")
    sim_detection("lan", seeds)
    sim_detection("local", seeds)
    print("2. false positives and bandwidth under loss, in-memory simulation")
    sim_loss(seeds[:1] if args.quick else seeds[:3], minutes=5 if args.quick else 10)
    print("3. real UDP on loopback, separate processes (wall-clock seconds)")
    udp_processes(runs=3 if args.quick else 7)


if __name__ == "__main__":
    main()
