"""The scale lab: 5 managers + N worker agents as real processes on netns hosts, measured.

    .venv/bin/python bench/scale_lab.py [--workers 100] [--managers 5] [--tasks 1000]
        [--kill 10] [--window 30] [--phases idle5,join,idle,feed,scale,kill,down] [--hold]
        [--network-mode default|host|none]
    make scale-lab                      # the same with the defaults

Owns: one tests/netlab.py lab of managers+workers hosts (network namespaces on one bridge),
the agents in it, the service it creates, and the figures it prints. Must not touch anything
else: the lab is torn down completely at the end, on failure, on Ctrl-C and on SIGTERM
(netns, processes, the tasks' cgroups, /tmp/shoal-lab/shoal-lab-RID).

Why netns hosts and not loopback addresses: each agent needs its own ports, its own cluster
network bridge and routes (shoal0, per-node task subnets) and its own task namespaces; in one
shared namespace those collide. A netns costs a veth pair and ~3 ms of `ip` calls, nothing at
run time. But not on one bridge: the kernel's ARP table is shared by every namespace
(gc_thresh3 = 1,024 entries machine-wide) and 105 bridged hosts that all gossip with each
other need ~100² entries — the first run overflowed it and new hosts (and other labs on the
machine) could not reach anyone. So the hosts are point to point (tests/netlab.py
``point_to_point``): a /32 each, routed by the switch namespace, one ARP entry per host. The
cost: the cluster network's routes "via a peer" are refused (peers are not on-link), so tasks
on different hosts cannot talk here; the lab's tasks are `sleep`s and do not need to.

The agents run with the settings a deployment uses (the `lan` gossip preset, the default
feed and heartbeat settings): nothing here is tuned for the lab. The managers are drained
once up (manager-only nodes, as Docker advises for a cluster of this size; the tasks run on
the workers; ``--managers-run-tasks`` leaves them active) and run at nice -10
(``--manager-nice``); ``--manager-cpus LIST`` pins them to those CPUs and everything else to
the rest (which core runs what); ``--manager-shares N`` puts each manager agent in a cpu
cgroup of its own with that weight (managers on hosts of their own, as far as one kernel's
scheduler can say so).

Phases (each prints its figures with the load average and free memory at the time):

* ``idle5``  the managers alone (no worker yet): CPU % and RSS per agent over --window s;
* ``join``   every worker sends `join` at the same instant (one thread each, straight to its
             agent's unix socket, no CLI start-up in the way) → time until `node ls` on the
             first manager shows all of them Ready; nodes seen down after being Ready during
             the storm (false deaths);
* ``idle``   CPU/RSS per agent at full size (managers and workers apart);
* ``feed``   the workers' state feed at full size: replies and bytes the managers send per
             Raft commit (shoal_feed_* metrics summed over the managers) for a burst of
             single-command commits;
* ``scale``  a service of host-rootfs ``sleep`` tasks 0 → --tasks: time until every task is
             assigned (placements/s) and until all are RUNNING. ``--network-mode host``
             gives them no network namespace of their own: every task's netns, veth,
             address and route goes through the one kernel's rtnl_lock that all the lab's
             "hosts" share (docs/scaling.md), which a real 100-host cluster spreads over 100
             kernels; host networking measures the rest of the start path;
* ``kill``   SIGKILL the agents of --kill workers at once (their hosts' links are cut too, as
             a power loss would) → time until the service is back at --tasks RUNNING on the
             others (``--settle S`` waits S seconds first, so that it runs in a quiet
             cluster rather than under the scale's load); then where the time went, from
             the leader's event log (gossip suspect/dead as the leader saw them, node DOWN,
             the replacements created, assigned, spawned on their node, reported RUNNING)
             and the leader's CPU by thread;
* ``down``   scale to 0 → time until no task of the service is running.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import multiplier_args

from netlab import Host, Lab, remove_empty_cgroup_parents, wait_until
from shoal.cli.client import Client
from shoal.cli.errors import CliError

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SERVICE = "scale"
PHASES = ("idle5", "join", "idle", "feed", "scale", "kill", "down")


def _stat_cpu(stat: Path) -> float:
    """utime + stime of a /proc/.../stat file, seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(pid: int) -> float:
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``: "loop" (the main thread: the agent's event
    loop) and "thread TID" for the others (Python leaves them unnamed; py-spy dump tells
    which is which: Raft's tick thread, gossip's, the executor's)."""
    out: dict[str, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        tid = int(stat.parent.name)
        try:
            out["loop" if tid == pid else f"thread {tid}"] = _stat_cpu(stat)
        except OSError:  # (a thread that ended meanwhile)
            continue
    return out


def host_cgroup(lab: Lab, host: Host) -> str:
    """The parent cgroup of ``host``'s tasks with --host-cgroups."""
    return f"shoal-{lab.runid}-{host.name}"


CPU_V1 = Path("/sys/fs/cgroup/cpu")


def manager_cpu_group(lab: Lab, host: Host) -> Path:
    """The cgroup-v1 cpu group of ``host``'s agent with --manager-shares."""
    return CPU_V1 / f"shoal-{lab.runid}-{host.name}-agent"


def in_cpu_group(group: Path, shares: int) -> list[str]:
    """Make ``group`` (cpu.shares = ``shares``) and return the argv prefix that runs a
    command in it: a shell that moves itself there, then execs the command. (Where /sys
    shows no cgroups — the lab's CLI runs under `ip netns exec` — it just execs: the CLI
    may run anywhere; :func:`check_cpu_groups` checks the agents did join.)"""
    if not (CPU_V1 / "cpu.shares").exists():
        raise SystemExit("--manager-shares needs the cgroup v1 cpu hierarchy at "
                         f"{CPU_V1} (this machine has none)")
    group.mkdir(exist_ok=True)
    (group / "cpu.shares").write_text(str(shares))
    return ["sh", "-c", '[ -d "$0" ] && echo $$ > "$0/cgroup.procs"; exec "$@"', str(group)]


def check_cpu_groups(lab: Lab, hosts: list[Host]) -> None:
    """Each of ``hosts``' agents runs in its --manager-shares group (SystemExit if not)."""
    for h in hosts:
        procs = (manager_cpu_group(lab, h) / "cgroup.procs").read_text().split()
        if str(h.agent_pid) not in procs:
            raise SystemExit(f"{h.name}'s agent (pid {h.agent_pid}) is not in its cpu group")


def remove_cgroup_parent(name: str) -> list[str]:
    """rmdir the parent cgroup ``name`` under each hierarchy; the ones that stay (still
    holding a task group) are returned, for the teardown's leftovers."""
    base = Path("/sys/fs/cgroup")
    remove_empty_cgroup_parents(name)
    return [str(p) for p in [base / name, *base.glob(f"*/{name}")] if p.exists()]


def cpu_split(managers: str) -> tuple[list[str], list[str]]:
    """``taskset`` prefixes for the managers' CPUs (a taskset list) and the others ([] and
    [] when not split)."""
    if not managers:
        return [], []
    mine = {int(c) for part in managers.split(",") for c in (
        range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    others = sorted(os.sched_getaffinity(0) - mine)
    if not others or not mine <= os.sched_getaffinity(0):
        raise SystemExit(f"--manager-cpus {managers}: leaves no CPU for the workers, or names "
                         f"one this process may not use ({sorted(os.sched_getaffinity(0))})")
    return (["taskset", "-c", ",".join(map(str, sorted(mine)))],
            ["taskset", "-c", ",".join(map(str, others))])


def leader_cpu(leader: Host, before: dict[str, float], took: float) -> str:
    """The leader's busiest threads since ``before`` (``thread_cpu``), as a phrase."""
    if leader.agent_pid is None or not leader.agent_alive():
        return f"the first leader ({leader.name}) is gone"
    after = thread_cpu(leader.agent_pid)
    busy = sorted(((after[k] - before.get(k, 0.0)) / took * 100, k) for k in after)[::-1]
    return (f"the leader at the start ({leader.name}) over those {took:.1f} s, % of a core by "
            "thread: " + ", ".join(f"{name} {pct:.0f}" for pct, name in busy[:4] if pct >= 1))


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / (1 << 20)


def machine() -> str:
    """Load average and available memory now (every figure is printed with it)."""
    la = " ".join(f"{x:.1f}" for x in os.getloadavg())
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
    return f"[load {la}; {avail / 1024:.1f} GiB available]"


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def scrape(h: Host, prefix: str) -> dict[str, float]:
    """The agent's metrics whose name starts with ``prefix``: ``name{labels}`` → value."""
    pat = re.compile(r"^(" + re.escape(prefix) + r"[a-z_]*)(\{[^}]*\})? ([0-9.e+-]+)$")
    conn = client(h, timeout=30.0)._connection()  # /metrics is text, not JSON
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def client(h: Host, timeout: float = 60.0, stale: bool = True) -> Client:
    c = Client(f"unix://{h.sock}", timeout=timeout)
    c.stale = stale
    return c


class ScaleLab:
    def __init__(self, lab: Lab, managers: int, workers: int,
                 manager_args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.manager_args = manager_args  # extra `shoal agent` flags of the managers
        self.drain_managers = True  # no tasks on the managers (--managers-run-tasks: False)
        self.managers = lab.hosts[:managers]
        self.workers = lab.hosts[managers:managers + workers]
        self.first = self.managers[0]
        self.killed: set[str] = set()  # addresses of workers killed by the kill phase

    # ---------------------------------------------------------------- forming
    def up_managers(self) -> None:
        t0 = time.monotonic()
        self.lab.start_agents(self.managers, *self.manager_args)
        self.first.cli("init")
        token = self.first.cli("join-token", "manager", "-q").stdout.strip()
        for h in self.managers[1:]:
            h.cli("join", "--token", token, f"{self.first.ip}:2377", timeout=60)
        self.wait_nodes(len(self.managers), timeout=120)
        say(f"{len(self.managers)} managers up in {time.monotonic() - t0:.1f} s {machine()}")
        if self.drain_managers:  # manager-only nodes, as Docker advises for clusters this size
            for h in self.managers:
                client(self.first, stale=False).call(
                    "POST", f"/v1/nodes/{h.name}", {"availability": "drain"})
            say("managers drained: the tasks run on the workers (--managers-run-tasks: not)")

    def nodes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = client(self.first).call("GET", "/v1/nodes")
        return out

    def wait_nodes(self, n: int, timeout: float) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            nodes = self.nodes()
            ok = [x for x in nodes if x["state"] == "ready"]
            return nodes if len(ok) >= n else None
        return wait_until(ready, timeout=timeout, interval=0.5, what=f"{n} nodes ready")

    # ---------------------------------------------------------------- idle
    def idle(self, label: str, window: float) -> None:
        hosts = [h for h in self.lab.hosts if h.agent_alive()]
        pids = {h.name: h.agent_pid for h in hosts}
        role = {x["addr"]: ("leader" if x["manager_status"] == "leader" else x["role"])
                for x in self.nodes()}
        start = {n: cpu_seconds(p) for n, p in pids.items() if p}
        index0, journal0 = self.raft_index(), self.journal_bytes()
        t0 = time.monotonic()
        time.sleep(window)
        took = time.monotonic() - t0
        index1, journal1 = self.raft_index(), self.journal_bytes()
        per: dict[str, list[tuple[float, float]]] = {}
        for h in hosts:
            pid = pids[h.name]
            assert pid is not None
            pct = 100.0 * (cpu_seconds(pid) - start[h.name]) / took
            per.setdefault(role.get(h.ip, "?"), []).append((pct, rss_mib(pid)))
        say(f"idle {label}: {took:.0f} s window, {len(hosts)} agents {machine()}")
        for r, vals in sorted(per.items()):
            cpus = [v[0] for v in vals]
            rss = [v[1] for v in vals]
            print(f"    {r:8} n={len(vals):3}  cpu median {statistics.median(cpus):5.2f} % "
                  f"(max {max(cpus):5.2f})  rss median {statistics.median(rss):5.1f} MiB "
                  f"(max {max(rss):5.1f})", flush=True)
        per_hour = 3600.0 / took
        print(f"    raft log: index {index0} → {index1} ({(index1 - index0) * per_hour:.0f} "
              f"entries/hour); first manager's journal {journal0} → {journal1} B "
              f"({(journal1 - journal0) * per_hour / 1024:.1f} KiB/hour)", flush=True)

    def journal_bytes(self) -> int:
        """The size of the first manager's Raft journal (and dump) on disk."""
        raft_dir = self.managers[0].data_dir / "raft"
        return sum(p.stat().st_size for p in raft_dir.glob("raft.*") if p.is_file())

    # ---------------------------------------------------------------- join storm
    def join_storm(self, timeout: float, wave: int = 0) -> None:
        """All workers join at once (``wave`` 0), or ``wave`` at a time, each wave sent
        when the previous one is Ready (what a rolling deployment does)."""
        if wave:
            t0 = time.monotonic()
            for i in range(0, len(self.workers), wave):
                self._join(timeout, self.workers[i:i + wave])
            say(f"joined {len(self.workers)} workers in waves of {wave}: "
                f"{time.monotonic() - t0:.1f} s in all {machine()}")
            return
        self._join(timeout, self.workers)

    def _join(self, timeout: float, workers: list[Host]) -> None:
        token = self.first.cli("join-token", "worker", "-q").stdout.strip()
        remote = f"{self.first.ip}:2377"
        joined = {x["addr"] for x in self.nodes() if x["state"] == "ready"}
        term0 = self.term()
        n_total = len(joined) + len(workers)
        errors: list[str] = []
        failed: set[str] = set()  # hostnames whose join call failed
        catching_up: set[str] = set()  # admitted, answered before their feed caught up
        go = threading.Event()

        def join(h: Host) -> float:
            go.wait()
            t = time.monotonic()
            try:
                r = client(h, timeout=timeout, stale=False).call(
                    "POST", "/v1/swarm/join", {"token": token, "remote": remote})
                if r.get("catching_up"):
                    catching_up.add(h.name)
            except CliError as exc:
                errors.append(f"{h.name}: {exc}")
                failed.add(h.name)
            return time.monotonic() - t

        seen_ready: set[str] = set()
        false_deaths: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
            futs = [pool.submit(join, h) for h in workers]
            time.sleep(0.5)  # every thread parked on the event
            t0 = time.monotonic()
            go.set()
            done_at = None
            while time.monotonic() - t0 < timeout:
                try:
                    nodes = self.nodes()
                except CliError:
                    time.sleep(0.5)
                    continue
                for x in nodes:
                    if x["state"] == "ready":
                        seen_ready.add(x["id"])
                    elif x["id"] in seen_ready and x["state"] == "down":
                        false_deaths.append(f"{x['hostname']} down at "
                                            f"{time.monotonic() - t0:.1f} s")
                        seen_ready.discard(x["id"])
                ready = sum(1 for x in nodes if x["state"] == "ready")
                if ready >= n_total and done_at is None:
                    done_at = time.monotonic() - t0
                    say(f"join storm: {len(workers)} joining, all {n_total} nodes Ready "
                        f"after {done_at:.1f} s {machine()}")
                    deadline = time.monotonic() + 10  # watch 10 s more for late deaths
                if done_at is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            calls = [f.result() for f in futs]
        if done_at is None:
            say(f"join storm: {len(workers)} joining, NOT all Ready after {timeout:.0f} s "
                f"({ready}/{n_total}) {machine()}")
        print(f"    join calls returned: median {statistics.median(calls):.1f} s, "
              f"max {max(calls):.1f} s; {len(errors)} failed, {len(catching_up)} answered "
              f"'admitted, catching up'; Raft term {term0} → "
              f"{self.term()}", flush=True)
        for e in errors[:3]:
            print(f"      {e[:200]}")
        # a node whose join call failed after the manager had added it goes Down (its agent
        # never started as a member): counted apart from deaths of nodes that did join
        zombies = [d for d in false_deaths if d.split()[0] in failed]
        deaths = [d for d in false_deaths if d.split()[0] not in failed]
        print(f"    nodes added but their join failed (then Down): {len(zombies)}; "
              f"false deaths of joined nodes during the storm (+10 s): {len(deaths)} "
              f"{deaths[:5]}", flush=True)

    def profile(self, out_dir: str, before: dict[str, Any] | None = None,
                host: Host | None = None) -> dict[str, Any] | None:
        """A manager's sampled stacks (--profile; the first manager's unless ``host``):
        the dump now, and printed what was sampled since ``before``."""
        host = host or self.first
        pid = host.agent_pid
        if not out_dir or pid is None:
            return None
        time.sleep(2.5)  # the sampler rewrites its dump every 2 s
        path = Path(out_dir) / f"prof-{pid}.json"
        if not path.exists():
            return None
        now: dict[str, Any] = json.loads(path.read_text())
        if before is not None:
            from profile_report import diff, report
            say(f"profile of manager {host.name}, pid {pid}, during the phase:")
            print(report(diff(now, before), 30), flush=True)
        return now

    def leader_host(self) -> Host:
        """The manager that leads now (the first one if none is known)."""
        addr = next((x["addr"] for x in self.nodes() if x["manager_status"] == "leader"), "")
        return next((h for h in self.managers if h.ip == addr), self.first)

    # ---------------------------------------------------------------- feed
    def feed_counters(self) -> dict[str, float]:
        """shoal_feed_* summed over the managers (GET /metrics on each unix socket)."""
        total: dict[str, float] = {}
        for h in self.managers:
            if h.agent_alive():
                for key, value in scrape(h, "shoal_feed_").items():
                    total[key] = total.get(key, 0.0) + value
        return total

    @staticmethod
    def agents_cpu(hosts: list[Host]) -> float:
        """CPU seconds the agent processes of ``hosts`` used so far (their tasks not
        included: those are other processes)."""
        total = 0.0
        for h in hosts:
            if h.agent_pid is not None:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(h.agent_pid)
        return total

    def term(self) -> int:
        """The Raft term as the first manager sees it (elections = its growth)."""
        for h in self.managers:
            try:
                return int(client(h).call("GET", "/v1/info").get("term", 0))
            except CliError:
                continue
        return 0

    def raft_index(self) -> int:
        """The leader's applied index (commits so far)."""
        out: dict[str, Any] = client(self.first).call("GET", "/v1/info")
        for key in ("index", "raft_index", "applied_index"):
            if isinstance(out.get(key), int):
                return int(out[key])
        raft = out.get("raft")
        if isinstance(raft, dict) and isinstance(raft.get("applied_index"), int):
            return int(raft["applied_index"])
        return 0

    def print_feed(self, before: dict[str, float], commits: int, what: str) -> None:
        after = self.feed_counters()
        print(f"    feed {what}: {commits} commits", flush=True)
        for key in sorted(after):
            d = after[key] - before.get(key, 0.0)
            if d and "polls_held" not in key and "waiting" not in key:
                print(f"      {key:55} +{d:12.0f}  ({d / max(commits, 1):10.1f} per commit)",
                      flush=True)

    def feed(self, commits: int) -> None:
        """Commits of one small command each (node label updates on the first manager),
        spaced so each is its own commit; the managers' feed counters before and after."""
        c = client(self.first, stale=False)
        node = self.managers[0].name
        before = self.feed_counters()
        t0 = time.monotonic()
        for i in range(commits):
            c.call("POST", f"/v1/nodes/{node}", {"label_add": {"scale-lab": str(i)}})
            time.sleep(0.3)
        time.sleep(2)
        took = time.monotonic() - t0
        after = self.feed_counters()
        say(f"feed: {commits} commits in {took:.1f} s, {len(self.workers)} workers "
            f"{machine()}")
        for key in sorted(after):
            d = after[key] - before.get(key, 0.0)
            if d:
                print(f"    {key:55} +{d:12.0f}  ({d / commits:10.1f} per commit)",
                      flush=True)

    # ---------------------------------------------------------------- tasks
    def tasks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = client(self.first, timeout=60).call(
            "GET", f"/v1/services/{SERVICE}/tasks")
        return out

    def running(self) -> int:
        """The service's running tasks, as `service ls` counts them (one small reply)."""
        view = client(self.first, timeout=60).call("GET", f"/v1/services/{SERVICE}")
        return int(view.get("running", 0))

    def scale(self, n: int, timeout: float, network_mode: str = "default") -> None:
        self.first.cli("service", "create", "--name", SERVICE, "--replicas", "0",
                       "--network-mode", network_mode, "--", "sleep", "1000000")
        c = client(self.first, stale=False)
        feed0 = self.feed_counters()
        raft0 = self.raft_index()
        term0, leader = self.term(), self.leader_host()
        assert leader.agent_pid is not None
        cpu0 = thread_cpu(leader.agent_pid)
        t0 = time.monotonic()
        c.call("POST", f"/v1/services/{SERVICE}/scale", {"replicas": n})
        assigned_at = running_at = None
        while time.monotonic() - t0 < timeout:
            now = time.monotonic() - t0
            if assigned_at is None:  # (the task list only until then: encoding 1,000 tasks
                #                        as JSON twice a second was half the leader's work)
                ts = [t for t in self.tasks() if t["desired_state"] == "running"]
                if len(ts) >= n and all(t["node"] for t in ts):
                    assigned_at = now
            if self.running() >= n:
                running_at = time.monotonic() - t0
                break
            time.sleep(0.5)
        nodes = {t["node"] for t in self.tasks() if t["state"] == "running"}
        say(f"scale 0 → {n} (network mode {network_mode}): all assigned after {fmt(assigned_at)} "
            f"({n / assigned_at if assigned_at else 0:.0f} placements/s incl. the API "
            f"round trip and the poll), all RUNNING after {fmt(running_at)} "
            f"({n / running_at if running_at else 0:.0f} tasks/s) on {len(nodes)} nodes "
            f"{machine()}")
        took = time.monotonic() - t0
        print(f"    Raft term {term0} → {self.term()}; " + leader_cpu(leader, cpu0, took),
              flush=True)
        self.print_feed(feed0, self.raft_index() - raft0, "during the scale")

    def kill(self, k: int, n: int, timeout: float, settle: float = 0.0) -> None:
        if settle:  # let the scale's starts die down: detection in a quiet cluster
            time.sleep(settle)
            say(f"kill phase after {settle:.0f} s of quiet {machine()}")
        by_node: dict[str, int] = {}
        for t in self.tasks():
            if t["state"] == "running" and t["node"]:
                by_node[t["node"]] = by_node.get(t["node"], 0) + 1
        names = {x["hostname"]: x["addr"] for x in self.nodes()}
        victims = [h for h in self.workers if h.name in by_node][:k]
        lost = sum(by_node[h.name] for h in victims)
        leader = self.leader_host()
        assert leader.agent_pid is not None
        feed0, raft0 = self.feed_counters(), self.raft_index()
        survivors = [h for h in self.workers if h not in victims and h.agent_pid is not None]
        workers0 = self.agents_cpu(survivors)
        cpu0 = thread_cpu(leader.agent_pid)
        wall0 = time.time()
        t0 = time.monotonic()
        for h in victims:  # a power loss: the agent dies and the host drops off the network
            h.kill_agent()
            h.cut_link()
            self.killed.add(names.get(h.name, h.ip))
        dead = {h.name for h in victims}
        down_at = back_at = None
        while time.monotonic() - t0 < timeout:
            now = time.monotonic() - t0
            if down_at is None and all(x["state"] == "down" for x in self.nodes()
                                       if x["hostname"] in dead):
                down_at = now
            # (the running count alone, one small reply: the command that takes a node
            # DOWN orphans its tasks, so once all are DOWN it counts only the live nodes'
            # tasks — the 1,000-task list here cost the loaded leader ~1-3 s per poll, which
            # the figure then included; where they run is checked after, untimed)
            if down_at is not None and self.running() >= n:
                back_at = time.monotonic() - t0
                break
            time.sleep(0.25)
        if back_at is not None:
            stray = sum(1 for t in self.tasks() if t["state"] == "running"
                        and t["desired_state"] == "running" and t["node"] in dead)
            if stray:
                say(f"  (!) {stray} tasks still counted running on the killed nodes")
        say(f"kill {len(victims)} workers ({lost} tasks): all down after {fmt(down_at)}, "
            f"{n} RUNNING again after {fmt(back_at)} {machine()}")
        took = time.monotonic() - t0
        cpu = leader_cpu(leader, cpu0, took)
        workers_cpu = self.agents_cpu(survivors) - workers0
        self.kill_breakdown(leader, wall0, dead)
        print(f"    {cpu}", flush=True)
        print(f"    the {len(survivors)} other worker agents over those {took:.1f} s: "
              f"{workers_cpu:.1f} CPU seconds ({workers_cpu / took:.2f} cores)", flush=True)
        self.print_feed(feed0, self.raft_index() - raft0, "during the kill")

    def kill_breakdown(self, leader: Host, wall0: float, dead: set[str]) -> None:
        """Where the replacement time went, from the cluster's own event log: each event's
        time is the leader's clock when it proposed the command (the same on every manager),
        so the phases below do not include the bench's polling. Read from the leader: its
        gossip events (not in the log) are what its liveness pass saw."""
        events: dict[tuple[str, str], list[float]] = {}
        created: dict[str, float] = {}  # replacement task id → its creation time
        try:
            records = client(leader, timeout=60).stream(
                f"/v1/events?since={wall0:.3f}&until={time.time():.3f}")
            for r in records:
                if r.get("type") == "node" and r.get("name") in dead:
                    events.setdefault(("node", r["action"]), []).append(r["time"] - wall0)
                elif r.get("type") == "task" and r.get("attributes", {}).get(
                        "service") == SERVICE:
                    if r["action"] == "create":
                        created[r["id"]] = r["time"]  # (a replacement: created after the kill)
                    if r["id"] in created or r["action"] == "orphaned":
                        events.setdefault(("task", r["action"]), []).append(r["time"] - wall0)
                    start = r.get("attributes", {}).get("start_seconds")
                    if r["action"] == "running" and r["id"] in created and start is not None:
                        # the node's clock when it spawned the launcher (same machine here)
                        events.setdefault(("task", "spawned@node"), []).append(
                            created[r["id"]] + float(start) - wall0)
        except (CliError, OSError) as exc:
            say(f"  (no event breakdown: {exc})")
            return
        say("  from the event log (seconds after the kill: first / median / last):")
        for (kind, action), ts in sorted(events.items(), key=lambda kv: min(kv[1])):
            ts.sort()
            print(f"    {kind} {action:12} n={len(ts):<4} {ts[0]:7.2f} "
                  f"{statistics.median(ts):7.2f} {ts[-1]:7.2f}", flush=True)
        # the leader's slow passes in the window (node/leader.py SLOW_PASS): where the time
        # between gossip's verdicts and the replacements' commit went
        try:
            lines = leader.agent_log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            if "slow leader pass" in line and _log_time(line) >= wall0:
                print(f"    leader at +{_log_time(line) - wall0:.2f} s: "
                      f"{line.split('slow leader pass: ', 1)[1]}", flush=True)

    def down(self, timeout: float) -> None:
        c = client(self.first, stale=False)
        t0 = time.monotonic()
        c.call("POST", f"/v1/services/{SERVICE}/scale", {"replicas": 0})
        gone_at = None
        while time.monotonic() - t0 < timeout:
            left = [t for t in self.tasks() if t["state"] == "running"
                    and t["node"] not in {h.name for h in self.lab.hosts
                                          if not h.agent_alive()}]
            if not left:
                gone_at = time.monotonic() - t0
                break
            time.sleep(0.5)
        say(f"scale → 0: no task running after {fmt(gone_at)} {machine()}")


def _log_time(line: str) -> float:
    """The wall-clock time of an agent log line ("2026-12-07 00:34:09,123 ..."), 0 if none."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
    if not m:
        return 0.0
    stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    return stamp + int(m.group(2)) / 1000


def join_phase(s: ScaleLab, args: argparse.Namespace) -> None:
    before = s.profile(args.profile)
    s.join_storm(timeout=180, wave=args.join_wave)
    s.profile(args.profile, before)


def idle_phase(s: ScaleLab, args: argparse.Namespace) -> None:
    time.sleep(10)
    leader = s.leader_host()
    before = s.profile(args.profile, host=leader)
    s.idle(f"{args.managers} managers + {args.workers} workers", args.window)
    s.profile(args.profile, before, host=leader)


def fmt(x: float | None) -> str:
    return f"{x:.1f} s" if x is not None else "(not reached)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--managers", type=int, default=5)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--kill", type=int, default=10)
    ap.add_argument("--window", type=float, default=30.0, help="idle window, seconds")
    ap.add_argument("--join-wave", type=int, default=0, metavar="N",
                    help="join N workers at a time (default 0: all at once)")
    ap.add_argument("--commits", type=int, default=20, help="commits of the feed phase")
    ap.add_argument("--sizes", default="", metavar="N,N,...",
                    help="a curve: join workers up to each size in turn (in --join-wave "
                    "waves) and run the idle and feed phases at each, e.g. 10,50,100")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--bridge", action="store_true",
                    help="hosts on one bridge (tests/netlab.py's default) instead of point to "
                    "point: overflows the kernel's ARP table beyond ~30 hosts (see netlab)")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="sample the managers' stacks (bench/profhook) into DIR/prof-PID.json "
                    "and print the first manager's (the leader's) top functions after the "
                    "join phase (bench/profile_report.py)")
    ap.add_argument("--raft-multiplier", type=float, default=1.0, metavar="N",
                    help="the managers' --raft-multiplier (default 1)")
    ap.add_argument("--manager-nice", type=int, default=-10, metavar="N",
                    help="run the manager agents at this nice value (default -10: in a "
                         "deployment of this size managers have hosts of their own; here "
                         "they share 2 cores with 100 workers starting 1,000 tasks, load "
                         "~180, and at the workers' priority they lose Raft heartbeats to "
                         "them; 0 = the same priority)")
    ap.add_argument("--managers-run-tasks", action="store_true",
                    help="leave the managers' availability active (default: drained, the "
                    "manager-only nodes Docker advises for a cluster of this size; the scale "
                    "phase's tasks then run on the workers alone)")
    ap.add_argument("--host-cgroups", action="store_true",
                    help="give each worker's tasks a parent cgroup of their own (agent "
                    "--cgroup-parent shoal-RUNID-HOST) instead of the one `shoal` parent all "
                    "100 hosts share: with it the 1,000 tasks of 100 hosts weigh as one "
                    "process against the 105 agents in the CPU scheduler, which no real "
                    "host sees (each has its own kernel and its own `shoal` group)")
    ap.add_argument("--manager-shares", type=int, default=0, metavar="N",
                    help="run each manager agent in a cpu cgroup of its own with cpu.shares "
                    "N (cgroup v1; 1024 = one default process), made and removed here: "
                    "N far above 1024 models managers on hosts of their own — in the "
                    "CPU scheduler the manager's whole process then weighs N against each "
                    "runnable worker thread's 1024, where nice -10 weighs each of its "
                    "threads ~9.3 x (default 0: off). Measured with 65536 on 2 cores: "
                    "worse — starved workers' heartbeats expire on time, docs/scaling.md")
    ap.add_argument("--manager-cpus", default="", metavar="LIST",
                    help="run the manager agents on these CPUs (taskset list, e.g. 0) and the "
                    "workers, with their tasks, on the others: the managers' own hosts of a "
                    "deployment, on this machine (default: every agent on every CPU)")
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="seconds to wait before the kill phase (default 0: right after "
                    "the scale, under its load)")
    ap.add_argument("--network-mode", choices=("default", "host", "none"), default="default",
                    help="the scale phase's tasks: their own netns on the cluster network "
                    "(default), the node's (host) or one with only lo (none)")
    ap.add_argument("--hold", action="store_true",
                    help="keep the lab up after the phases until Ctrl-C")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phases {bad}")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    say(f"scale lab: {args.managers} managers + {args.workers} workers {machine()}")
    lab: Lab | None = None
    left: list[str] = []
    try:
        t0 = time.monotonic()
        lab = Lab(args.managers + args.workers, point_to_point=not args.bridge)
        say(f"{len(lab.hosts)} netns hosts in {time.monotonic() - t0:.1f} s")
        s = ScaleLab(lab, args.managers, args.workers, multiplier_args(args.raft_multiplier))
        s.drain_managers = not args.managers_run_tasks
        manager_env: dict[str, str] = {}
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            hook = str(Path(__file__).resolve().parent / "profhook")
            manager_env = {"PYTHONPATH": hook, "SHOAL_PROFILE_DIR": args.profile}
        pin, rest = cpu_split(args.manager_cpus)
        for h in s.managers:  # (the CLI run on them too: harmless)
            nice = ["nice", "-n", str(args.manager_nice)] if args.manager_nice else []
            group = in_cpu_group(manager_cpu_group(lab, h), args.manager_shares) \
                if args.manager_shares else []
            h.use_shoal([*group, *nice, *pin, *h.shoal_argv], env=manager_env)
        for h in s.workers:
            h.use_shoal([*rest, *h.shoal_argv])
            if args.host_cgroups:  # this host's tasks: a CPU share of their own
                h.agent_args = ("--cgroup-parent", host_cgroup(lab, h))
        if args.manager_nice:
            say(f"manager agents at nice {args.manager_nice} (--manager-nice)")
        if args.manager_shares:
            say(f"manager agents each in a cpu cgroup with cpu.shares {args.manager_shares} "
                "(--manager-shares)")
        if pin:
            say(f"manager agents on CPUs {pin[-1]}, workers and their tasks on {rest[-1]} "
                "(--manager-cpus)")
        s.up_managers()
        if args.manager_shares:
            check_cpu_groups(lab, s.managers)
        if "idle5" in phases:
            s.idle(f"{args.managers} managers, no worker", args.window)
        t0 = time.monotonic()
        lab.start_agents(s.workers)
        say(f"{args.workers} worker agents started (not joined) in "
            f"{time.monotonic() - t0:.1f} s {machine()}")
        steps: dict[str, Callable[[], None]] = {
            "join": lambda: join_phase(s, args),
            "idle": lambda: idle_phase(s, args),
            "feed": lambda: s.feed(args.commits),
            "scale": lambda: s.scale(args.tasks, timeout=300, network_mode=args.network_mode),
            "kill": lambda: s.kill(args.kill, args.tasks, timeout=120, settle=args.settle),
            "down": lambda: s.down(timeout=180),
        }
        if args.sizes:
            joined = 0
            for size in [int(x) for x in args.sizes.split(",")]:
                batch = s.workers[joined:size]
                t0 = time.monotonic()
                for i in range(0, len(batch), args.join_wave or len(batch)):
                    s._join(180, batch[i:i + (args.join_wave or len(batch))])
                joined = size
                say(f"curve: {size} workers joined (+{len(batch)} in "
                    f"{time.monotonic() - t0:.1f} s) {machine()}")
                time.sleep(10)
                s.idle(f"{args.managers} managers + {size} workers", args.window)
                s.feed(args.commits)
            phases = [p for p in phases if p not in ("join", "idle", "feed")]
        elif "join" not in phases:
            steps["join"]()  # the rest needs the workers in
        for p in PHASES[1:]:
            if p in phases:
                steps[p]()
        if args.hold:
            say(f"holding the lab {lab.runid} (Ctrl-C tears it down)")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc or 'Ctrl-C'}): tearing down")
    finally:
        if lab is not None:
            t0 = time.monotonic()
            left = lab.close()
            if args.host_cgroups:
                left += [f"cgroup parent {p}" for h in lab.hosts
                         for p in remove_cgroup_parent(host_cgroup(lab, h))]
            for h in lab.hosts if args.manager_shares else []:  # (empty: agents gone)
                cpu_group = manager_cpu_group(lab, h)
                if cpu_group.exists():
                    try:
                        cpu_group.rmdir()
                    except OSError as exc:
                        left.append(f"cpu group {cpu_group}: {exc}")
            say(f"torn down in {time.monotonic() - t0:.1f} s; leftovers: "
                f"{json.dumps(left) if left else 'none'} {machine()}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
