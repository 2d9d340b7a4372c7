"""Benchmark of shoal.gossip with its default (LAN) configuration: detection time, false
positives, bandwidth, convergence, and node death → tasks replaced on a netns cluster.

Prints figures; never passes or fails. Run from the repository root (root needed for
``cluster``)::

    .venv/bin/python bench/gossip_bench.py                      # every section, ~35 min
    .venv/bin/python bench/gossip_bench.py sim udp10 udp100     # some sections
    .venv/bin/python bench/gossip_bench.py --quick              # fewer runs, shorter windows

Sections (all use ``Config.lan()``, the agent's default, unless said otherwise):

sim        in-memory simulation (virtual time), 10 and 100 members: kill → dead everywhere,
           median over seeds. The protocol alone: no CPU, no scheduler.
simkill    the same for the scale lab's kill phase: 10 of 105 members crash at once, the
           first 5 confirm suspicions (the managers); when m00 (a manager) sees each dead.
udp10      10 processes (``python -m shoal.gossip``, uvloop, AES-GCM) on loopback: SIGKILL →
           every other process marks it dead (time taken from the processes' own event
           timestamps), median over runs (the victim restarts on its port between runs);
           then bytes/s sent per member, CPU and RSS per process, at idle.
udp100     the same with 100 processes, started 10 at a time (each seeded with 3 running
           ones) to spare the machine.
loss       simulation, 100 members, 5 % packet loss, 10 simulated minutes per seed: false
           deaths (any "dead" event: nobody crashed), suspicions, refutations, bytes/s.
starved    10 real processes for --starve-minutes, one of them CPU-starved, no crash: false
           deaths, suspicions of the starved one, its refutations and health score. Modes
           (--starve-mode): ``hog`` pins the victim and a busy loop (nice 0) on CPU 1 with
           taskset, so it gets half a core at best and waits behind the loop on each wakeup;
           ``stop`` is a SIGSTOP/SIGCONT duty cycle (stopped 0.4 s, running 0.4 s): the
           victim is completely unresponsive for 2 probe periods at a time, a harsher stand-in
           for a node starved by a noisy neighbour or swapping.
converge   simulation, join storm: N members start at once and all join through m00 (retrying
           when it refuses: 64 concurrent push-pulls); time until every member sees all N
           alive. N = 125, 250, 500, 1000. Unencrypted (the protocol is the same; AES-GCM
           only costs wall-clock time in a simulation).
cluster    netns lab (tests/netlab.py), 1 manager + 3 workers, agents with the default
           preset, service of 6 replicas: kill -9 a worker's agent, or cut its link; time
           until `node ls` shows it down and until the service has 6 replicas RUNNING on the
           other nodes (polled through the manager's unix socket every 50 ms); then restart /
           restore it and wait until it is ready and the service is back to exactly 6.

Load average is printed before and after each section: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shoal.gossip import Config, Memberlist, MemberState
from shoal.gossip.proctest import ProcessCluster
from shoal.gossip.simloop import run_simulation
from shoal.gossip.testing import SimCluster

CFG = Config.lan()
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _fmt(values: list[float], unit: str = "s") -> str:
    return (
        f"median {statistics.median(values):.2f} {unit}  min {min(values):.2f}  "
        f"max {max(values):.2f}  (n={len(values)})"
    )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f}"


def section(title: str) -> None:
    print(f"\n== {title}   [{_load()}]", flush=True)


# =============================================================================== simulation
def sim_detection(n: int, seeds: list[int]) -> None:
    async def one(seed: int) -> float:
        cluster = SimCluster(n, CFG, seed=seed)
        await cluster.start()
        await cluster.run_for(5)
        victim = random.Random(seed).choice(sorted(cluster.members)[1:])
        await cluster.crash(victim)
        took = await cluster.wait_until(
            lambda: cluster.all_see(victim, MemberState.DEAD), CFG.detection_bound(n) * 3, 0.01
        )
        await cluster.shutdown()
        return took

    t0 = time.perf_counter()
    times = [run_simulation(one(seed)) for seed in seeds]
    print(
        f"  sim {n:4d} members: kill -> dead everywhere  {_fmt(times)}   "
        f"[bound {CFG.detection_bound(n):.1f} s; wall {time.perf_counter() - t0:.1f} s]",
        flush=True,
    )


def sim_kill_many(n: int, kill: int, confirmers: int, seeds: list[int]) -> None:
    """The scale lab's kill phase, protocol only: ``kill`` of ``n`` members crash at once;
    the first ``confirmers`` members confirm suspicions (shoal's managers). Per seed, the
    last of the dead verdicts as m00 (a manager, where the leader acts on them) sees them."""

    async def one(seed: int) -> list[float]:
        cluster = SimCluster(n, CFG, seed=seed)
        await cluster.start()
        for i in range(confirmers):
            cluster.members[cluster.name_of(i)].confirm_suspicions = True
        await cluster.run_for(5)
        names = [cluster.name_of(i) for i in range(confirmers, n)]
        victims = random.Random(seed).sample(names, kill)
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(cluster.crash(v) for v in victims))
        seer = cluster.members[cluster.name_of(0)]

        def all_dead() -> bool:
            return all(
                (m := seer.member(v)) is not None and m.state == MemberState.DEAD
                for v in victims
            )

        await cluster.wait_until(all_dead, CFG.detection_bound(n) * 3, 0.01)
        verdicts = [
            o.at - start for v in victims for o in cluster.events_about(v, "dead", since=start)
            if o.observer == seer.name
        ]
        await cluster.shutdown()
        return verdicts

    t0 = time.perf_counter()
    runs = [run_simulation(one(seed)) for seed in seeds]
    print(
        f"  sim {n} members, {kill} crash at once, {confirmers} confirmers: dead at m00, "
        f"last of the {kill} {_fmt([max(r) for r in runs])}; every verdict "
        f"{_fmt([t for r in runs for t in r])}   [wall {time.perf_counter() - t0:.1f} s]",
        flush=True,
    )


def sim_loss(n: int, loss: float, seconds: float, seeds: list[int]) -> None:
    async def one(seed: int) -> dict[str, float]:
        cluster = SimCluster(n, CFG, seed=seed)
        await cluster.start()
        await cluster.run_for(5)
        cluster.net.loss = loss
        start = asyncio.get_running_loop().time()
        before = cluster.total_stats()
        await cluster.run_for(seconds)
        stats = cluster.total_stats()

        def delta(key: str) -> float:
            return float(stats.get(key, 0) - before.get(key, 0))

        out = {
            "dead": float(len(cluster.events_of_kind("dead", since=start))),
            "suspicions": delta("suspicions"),
            "refutes": delta("refutes"),
            "rearmed": delta("suspicions_rearmed"),
            "lost": float(cluster.net.stats["packets_lost"]),
            "sent": float(cluster.net.stats["packets_sent"]),
            "bps": delta("bytes_out") / n / seconds,
        }
        await cluster.shutdown()
        return out

    for seed in seeds:
        t0 = time.perf_counter()
        r = run_simulation(one(seed))
        print(
            f"  sim {n} members, {loss:.0%} loss, {seconds / 60:g} simulated min, seed {seed}: "
            f"false deaths {r['dead']:g}; refutations {r['refutes']:g} (= suspicions raised "
            f"and refuted; {r['suspicions']:g} suspect states summed over members), "
            f"last-chance re-arms {r['rearmed']:g}; packets lost "
            f"{r['lost'] / max(r['sent'], 1):.1%}; sent "
            f"{r['bps']:.0f} B/s per member   [wall {time.perf_counter() - t0:.0f} s]",
            flush=True,
        )


def sim_converge(sizes: list[int], seed: int = 1) -> None:
    async def one(n: int) -> tuple[float, float, int, float]:
        cluster = SimCluster(n, CFG, seed=seed, key=None)
        names = [cluster.name_of(i) for i in range(n)]
        for name in names:
            cluster.add(name)
        for name in names:
            await cluster.members[name].start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        seed_addr = cluster.address(names[0])
        last_join = 0.0

        async def join(name: str) -> None:
            nonlocal last_join
            await cluster.join(name, [seed_addr], attempts=60)
            last_join = max(last_join, loop.time() - start)

        joins = [asyncio.ensure_future(join(x)) for x in names[1:]]
        members: list[Memberlist] = list(cluster.members.values())
        while not all(m.num_live() == n for m in members):
            if loop.time() - start > 600:
                raise TimeoutError(f"{n} members did not converge in 600 simulated s")
            await asyncio.sleep(0.05)
        took = loop.time() - start
        await asyncio.gather(*joins)
        assert all(m.state == MemberState.ALIVE for m in members[0].members())
        refused = cluster.total_stats().get("streams_refused", 0)
        # one more member joins the settled cluster: how long until everyone knows it (one
        # broadcast spreading epidemically, the O(log n) part)
        await cluster.run_for(2.0)
        late = cluster.add("late")
        await late.start()
        joined = loop.time()
        await late.join([seed_addr])
        while not all(m.member("late") is not None for m in members):
            await asyncio.sleep(0.01)
        spread = loop.time() - joined
        await cluster.shutdown()
        return took, last_join, refused, spread

    for n in sizes:
        t0 = time.perf_counter()
        took, last_join, refused, spread = run_simulation(one(n))
        print(
            f"  sim join storm, {n:4d} members: everyone sees everyone alive after "
            f"{took:.2f} simulated s; last join accepted by the seed at {last_join:.2f} s "
            f"(it refused {refused} push-pulls beyond 64 at once; they retried); then one "
            f"more join known to all after {spread:.2f} s  "
            f"[log2 n = {math.log2(n):.1f}; wall {time.perf_counter() - t0:.0f} s]",
            flush=True,
        )


# =============================================================================== processes
def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _snapshot(cluster: ProcessCluster) -> dict[str, dict[str, int]]:
    for name in cluster.running():
        cluster.signal(name, signal.SIGUSR1)
    time.sleep(0.5)
    return cluster.last_stats()


def idle_costs(cluster: ProcessCluster, seconds: float) -> None:
    names = cluster.running()
    pids = {name: cluster.procs[name].pid for name in names}
    first = _snapshot(cluster)
    cpu0 = {name: _cpu_ticks(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    second = _snapshot(cluster)
    cpu1 = {name: _cpu_ticks(pid) for name, pid in pids.items()}
    dt = time.monotonic() - t0
    sent = [(second[k]["bytes_out"] - first[k]["bytes_out"]) / dt for k in names
            if k in first and k in second]
    pkts = [(second[k]["packets_out"] - first[k]["packets_out"]) / dt for k in names
            if k in first and k in second]
    cpu = [(cpu1[k] - cpu0[k]) / _CLK_TCK / dt * 100 for k in names]
    rss = [_rss_kib(pid) / 1024 for pid in pids.values()]
    print(
        f"  idle, {len(names)} processes, {dt:.0f} s: sent {statistics.mean(sent):.0f} B/s "
        f"({statistics.mean(pkts):.1f} packets/s) per member (received about the same); "
        f"CPU {statistics.mean(cpu):.1f} % of a core per process (max {max(cpu):.1f} %); "
        f"RSS {statistics.mean(rss):.0f} MiB per process",
        flush=True,
    )


def udp_detection(n: int, runs: int, batch: int, idle_seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-gossip-bench-") as tmp, \
            ProcessCluster(Path(tmp), preset="lan") as cluster:
            t0 = time.monotonic()
            cluster.start(n, timeout=300, batch=batch, pause=0.2)
            print(f"  {n} processes started and converged in {time.monotonic() - t0:.1f} s "
                  f"({_load()})", flush=True)
            time.sleep(3)
            times: list[float] = []
            kills: list[tuple[str, float]] = []
            for run in range(runs):
                victim = f"p{1 + (run * 7) % (n - 1)}"
                port = cluster.procs[victim].port
                cluster.wait_for(cluster.converged, 120, "convergence")
                killed = cluster.kill(victim)
                wall = cluster.procs[victim].killed_wall
                kills.append((victim, wall))

                def seen_dead(v: str = victim) -> bool:
                    return cluster.all_see(v, "dead")

                cluster.wait_for(seen_dead, 60, "detection")
                dead = cluster.events_about(victim, "dead", killed)
                times.append(max(e["t"] for e in dead) - wall)
                cluster.spawn(victim, [cluster.procs["p0"].address], port=port)
                cluster.wait_for(cluster.converged, 120, "rejoin")
                time.sleep(1.0)
            print(f"  udp {n} processes: SIGKILL -> dead everywhere  {_fmt(times)}  "
                  f"[{_load()}]", flush=True)
            false = [
                e for e in cluster.events
                if e.get("event") == "dead" and not any(
                    e.get("name") == v and at <= e.get("t", 0) <= at + 60 for v, at in kills)
            ]
            print(f"  false deaths during the runs: {len(false)}", flush=True)
            idle_costs(cluster, idle_seconds)


def _hog(cpu: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def starved(mode: str, minutes: float, n: int = 10) -> None:
    victim = "p5"
    hog: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="shoal-gossip-starve-") as tmp, \
            ProcessCluster(Path(tmp), preset="lan") as cluster:
            try:
                if mode == "hog":
                    cpu = max(os.sched_getaffinity(0))
                    hog = _hog(cpu)
                    first = cluster.spawn("p0", [])
                    cluster.wait_for(lambda: first.port != 0, 30, "p0 ready")
                    for i in range(1, n):
                        wrapper = ["taskset", "-c", str(cpu)] if f"p{i}" == victim else None
                        cluster.spawn(f"p{i}", [first.address], wrapper=wrapper)
                    cluster.wait_for(cluster.converged, 60, "convergence")
                else:
                    cluster.start(n, timeout=60)
                time.sleep(2)
                start_wall = time.time()
                before = _snapshot(cluster)
                deadline = time.monotonic() + minutes * 60
                pid = cluster.procs[victim].pid
                stops = 0
                while time.monotonic() < deadline:
                    if mode == "stop":
                        os.kill(pid, signal.SIGSTOP)
                        try:
                            time.sleep(0.4)
                        finally:
                            os.kill(pid, signal.SIGCONT)
                        stops += 1
                        time.sleep(0.4)
                    else:
                        time.sleep(1.0)
                after = _snapshot(cluster)
                dead = [e for e in cluster.events
                        if e.get("event") == "dead" and e.get("t", 0) >= start_wall]
                suspected = [e for e in cluster.events if e.get("event") == "suspect"
                             and e.get("name") == victim and e.get("t", 0) >= start_wall]
                others = [e for e in cluster.events if e.get("event") == "suspect"
                          and e.get("name") != victim and e.get("t", 0) >= start_wall]
                vb, va = before.get(victim, {}), after.get(victim, {})
                skipped = va.get("probes_skipped_self_slow", 0) - vb.get(
                    "probes_skipped_self_slow", 0)
                how = (f"taskset on CPU {max(os.sched_getaffinity(0))} with a nice-0 busy loop"
                       if mode == "hog" else f"SIGSTOP 0.4 s / SIGCONT 0.4 s x {stops}")
                print(
                    f"  {n} processes, {victim} starved ({how}), {minutes:g} real min: "
                    f"false deaths {len(dead)}; suspect events about {victim} "
                    f"{len(suspected)}, about others {len(others)}; {victim} refuted "
                    f"{va.get('refutes', 0) - vb.get('refutes', 0)} times, health score at the "
                    f"end {va.get('health_score', 0)}, probes skipped as self-slow "
                    f"{skipped}"
                    f"   [{_load()}]",
                    flush=True,
                )
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()


# =============================================================================== netns cluster
def netns_cluster(runs: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from netlab import Host, Lab, wait_until
    from shoal.cli.errors import CliError
    from shoal.cli.main import Client

    replicas = 6

    def api(h: Host) -> Client:
        return Client(f"unix://{h.sock}", timeout=5.0)

    def node_state(h1: Host, name: str) -> tuple[str, str]:
        for n in api(h1).call("GET", "/v1/nodes"):
            if n["hostname"] == name:
                return n["state"], n["membership"]
        return "?", "?"

    def replaced(h1: Host, avoid: str) -> bool:
        tasks = api(h1).call("GET", "/v1/services/bench/tasks")
        live = [t for t in tasks if t["state"] == "running" and t["desired_state"] == "running"
                and t["node"] != avoid]
        return len(live) == replicas

    def settled(h1: Host) -> bool:
        tasks = api(h1).call("GET", "/v1/services/bench/tasks")
        live = [t for t in tasks if t["state"] == "running" and t["desired_state"] == "running"]
        extra = [t for t in tasks if t["state"] == "running" and t["desired_state"] != "running"]
        return len(live) == replicas and not extra

    results: dict[str, list[tuple[float, float]]] = {"kill -9 agent": [], "cut link": []}
    with Lab(4) as lab:
        lab.form_cluster(managers=1, workers=3)
        h1 = lab.hosts[0]
        api(h1).call("POST", "/v1/services", {"spec": {
            "name": "bench", "task": {"container": {"command": ["sleep", "100000"]}},
            "mode": {"replicas": replicas}}})
        wait_until(lambda: settled(h1), timeout=60, what="service running")
        for run in range(runs):
            kind = "kill -9 agent" if run % 2 == 0 else "cut link"
            victim = lab.hosts[1 + run % 3]
            time.sleep(2.0)
            t0 = time.monotonic()
            if kind == "kill -9 agent":
                victim.kill_agent()
            else:
                victim.cut_link()
            # one question per poll: DOWN first (replacements come after it), so a slow
            # answer to the other question never delays seeing this one (a `service ps`
            # waited 1 s for a cut-off node's usage: the cut-link figure was 0.8 s late)
            down = running = 0.0
            while not (down and running):
                now = time.monotonic() - t0
                if now > 60:
                    raise TimeoutError(f"run {run}: no recovery after 60 s")
                try:
                    if not down:
                        if node_state(h1, victim.name)[0] == "down":
                            down = now
                    elif replaced(h1, victim.name):
                        running = now
                except CliError:
                    pass
                time.sleep(0.05)
            results[kind].append((down, running))
            print(f"  run {run + 1}: {kind} on {victim.name}: down after {down:.2f} s, "
                  f"{replicas} replicas running elsewhere after {running:.2f} s  [{_load()}]",
                  flush=True)
            if kind == "kill -9 agent":
                victim.start_agent()
            else:
                victim.restore_link()

            def back(name: str = victim.name) -> bool:
                return node_state(h1, name) == ("ready", "alive")

            wait_until(back, timeout=60, what=f"{victim.name} back")
            wait_until(lambda: settled(h1), timeout=60, what="exactly the replicas again")
    for kind, rows in results.items():
        if rows:
            print(f"  {kind}: node DOWN {_fmt([r[0] for r in rows])}")
            print(f"  {kind}: tasks RUNNING elsewhere {_fmt([r[1] for r in rows])}")
    both = [r[1] for rows in results.values() for r in rows]
    print(f"  all runs: node death -> replacement tasks RUNNING  {_fmt(both)}", flush=True)


SECTIONS = ("sim", "simkill", "udp10", "udp100", "loss", "starved", "converge", "cluster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"what to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer runs, shorter windows")
    parser.add_argument("--starve-minutes", type=float, default=None,
                        help="real minutes per starvation mode (default 10; --quick 1)")
    parser.add_argument("--starve-mode", choices=("hog", "stop", "both"), default="both")
    parser.add_argument("--loss-seeds", type=int, default=None, help="seeds for `loss`")
    args = parser.parse_args()
    chosen = args.sections or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    quick = args.quick
    print(f"shoal.gossip benchmark, Config.lan(): probe {CFG.probe_interval} s, timeout "
          f"{CFG.probe_timeout} s, suspicion x{CFG.suspicion_mult}, gossip "
          f"{CFG.gossip_interval} s; {os.cpu_count()} CPUs, {_load()}")
    if "sim" in chosen:
        section("1. detection time, in-memory simulation (simulated seconds)")
        seeds = list(range(1, 4 if quick else 12))
        sim_detection(10, seeds)
        sim_detection(100, seeds[: 3 if quick else 7])
    if "simkill" in chosen:
        section("1b. 10 of 105 crash at once (the scale lab's kill), simulation (simulated s)")
        sim_kill_many(105, 10, 5, list(range(1, 4 if quick else 9)))
    if "udp10" in chosen:
        section("2. real processes on loopback, 10 members (wall-clock seconds)")
        udp_detection(10, runs=3 if quick else 11, batch=0, idle_seconds=5 if quick else 20)
    if "udp100" in chosen:
        section("3. real processes on loopback, 100 members (wall-clock seconds)")
        udp_detection(100, runs=3 if quick else 7, batch=10, idle_seconds=5 if quick else 20)
    if "loss" in chosen:
        section("4. false positives under 5 % packet loss, simulation, 100 members")
        n_seeds = args.loss_seeds or (1 if quick else 3)
        sim_loss(100, 0.05, 60 if quick else 600, list(range(1, n_seeds + 1)))
    if "starved" in chosen:
        section("5. false positives with one CPU-starved member, 10 real processes")
        minutes = args.starve_minutes or (1.0 if quick else 10.0)
        for mode in ("stop", "hog") if args.starve_mode == "both" else (args.starve_mode,):
            starved(mode, minutes)
    if "converge" in chosen:
        section("6. join storm convergence, simulation (simulated seconds)")
        sim_converge([125, 250] if quick else [125, 250, 500, 1000])
    if "cluster" in chosen:
        section("7. node death -> replacement tasks RUNNING, netns cluster (1 + 3 nodes)")
        netns_cluster(runs=4 if quick else 10)
    print(f"\ndone [{_load()}]")


if __name__ == "__main__":
    main()
