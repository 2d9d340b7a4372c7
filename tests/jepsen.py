"""A Jepsen-style fault suite: concurrent clients against a netns cluster under faults.

Owns: the workload (clients through random managers creating uniquely named services, a
compare-and-set of a service's replicas through its version, linearizable reads), the
nemesis (kill -9 + restart, SIGSTOP/SIGCONT longer than the election timeout, partitions —
the leader's side a minority or a majority, a bridge that sees both sides —, packet loss
with iptables' statistic match, and a manager's Raft disk (a small tmpfs) filled to the last
byte; alone or a loss riding along another fault) on a seeded
schedule printed before the run, the recorded history (every op: invoke, ok/fail/info,
times) and the run's figures (faults, ops, acknowledged, lost, invented, linearizability and
invariant violations, the longest unavailability per fault kind, convergence after the last
heal). The checks themselves are tests/jepsen_check.py.

Mixed versions (``--old-release COMMIT --old-nodes K``): K agents run a previous release
(tests/oldrelease.py; h1 — which creates the cluster, so it starts at that release's schema —
then a worker, a manager, ...), the rest today's code, so the cluster keeps writing the old
schema the whole run and leadership moves between old and new managers under the faults. A
share of the creates then uses values only a later schema reads (schema 11: an env name with
a dot, a grace period over an hour, Docker's host-gateway, an arch constraint; schema 12: a
seccomp setting; schema 13: an anonymous volume; schema 14: a host name with a domain): each
must be refused while an old node of an older schema is in (one acknowledged is an invariant
violation), and the cluster's schema must not rise. With
``--upgrade-at SECONDS`` the old nodes are upgraded in place at that time of the workload
(one after another, SIGTERM and today's code): the leader must then raise the
schema, gated creates succeed from then on (none before the last old agent stopped), and
every node's record ends up describing its arch (node_describe). Any agent that died by
itself, or a traceback in an agent's log, is reported too.

Must not touch: anything outside the lab it is given (faults are iptables rules inside the
hosts' own namespaces and signals to the lab's own agents, tests/netlab.py).

Short run: tests/test_faults_suite.py (in `make test`). Long run, with the lab of the issue::

    make faults-long            # = python tests/jepsen.py --duration 1800 --seed $$RANDOM
    python tests/jepsen.py --managers 5 --workers 3 --duration 1800 --seed 7 \\
        --history /tmp/history.jsonl
    python tests/jepsen.py --managers 5 --workers 3 --duration 600 --seed 25 \\
        --old-release ccf4cf4 --old-nodes 2     # h1 and h6 run the schema-10 release
        [--upgrade-at 300]                      # ... until they are upgraded in place
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from helpers import fill_filesystem
from jepsen_check import INF, Op, RegisterResult, SetResult, check_register, check_set

import oldrelease
from netlab import Host, Lab
from shoal.raft.schema import ANON_VOLUMES, ENV_NAMES, HOSTNAME_DOMAIN, SCHEMA, SECCOMP

KINDS = ("kill", "kill-leader", "pause", "pause-leader", "partition-minority",
         "partition-majority", "bridge", "loss", "disk-full", "slow-links", "clock-skew")
DISK = "64m"  # each manager's Raft directory is a tmpfs this big (the disk-full fault fills it)
SPEC_COMMAND = ["sleep", "100000"]
# values only a later schema reads (raft/schema.py GATED, GATED_VALUES): a create's spec with
# one of them (refused while the cluster writes an older schema), by the schema that reads it
GATED_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("env-name", {"task": {"container": {"env": {"discovery.type": "single-node"}}}}),
    ("grace", {"task": {"container": {"stop_grace_period": 7200.0}}}),
    ("host-gateway", {"task": {"container": {
        "extra_hosts": ["host.docker.internal:host-gateway"]}}}),
    ("arch", {"task": {"placement": {"constraints": ["node.platform.arch==x86_64"]}}}),
    ("seccomp", {"task": {"container": {"seccomp": "unconfined"}}}),
    ("anon-volume", {"task": {"container": {"mounts": [{"type": "volume",
                                                         "target": "/data"}]}}}),
    ("fqdn", {"task": {"container": {"hostname": "mail.example.com"}}}))
GATED_SCHEMA = {"env-name": ENV_NAMES, "grace": ENV_NAMES, "host-gateway": ENV_NAMES,
                "arch": ENV_NAMES, "seccomp": SECCOMP, "anon-volume": ANON_VOLUMES,
                "fqdn": HOSTNAME_DOMAIN}


def gated_schema(key: str) -> int:
    """The schema that reads the value of a gated create ``g-P-SEQ-WHAT``."""
    return GATED_SCHEMA[key.split("-", 3)[3]]


@dataclass
class SuiteConfig:
    """One run. Times in seconds."""

    managers: int = 5
    workers: int = 3
    duration: float = 60.0  # workload under faults (setup and the final checks come on top)
    clients: int = 6  # concurrent client processes, each through a random manager per op
    registers: int = 3  # services whose replicas are compare-and-set registers
    seed: int = 0
    calm: tuple[float, float] = (2.0, 4.0)  # healthy time between two faults
    fault_len: tuple[float, float] = (3.0, 7.0)  # how long a fault lasts (pauses: 1.5-4)
    combine: float = 0.3  # chance that packet loss rides along with another fault
    kinds: tuple[str, ...] = KINDS
    op_timeout: float = 8.0  # a client gives up (outcome unknown) after this
    converge_timeout: float = 90.0  # after the last heal: every manager the same state
    history: Path | None = None  # write the history as JSON lines here
    old_release: str | None = None  # a commit: old_nodes hosts run it (tests/oldrelease.py)
    old_nodes: int = 2  # with old_release: h1 (it inits), then a worker, a manager, ...
    gated: float = 0.0  # share of the creates using a gated value (GATED_SPECS)
    # with old_release: at this time of the workload the old nodes are upgraded in place
    # (SIGTERM, today's code, one after another); the leader then raises the schema
    upgrade_at: float | None = None


@dataclass
class Fault:
    kinds: tuple[str, ...]
    start: float
    length: float
    end: float = INF
    detail: str = ""


@dataclass
class Report:
    config: SuiteConfig
    schedule: list[str]
    faults: list[Fault]
    ops: list[Op]
    set_result: SetResult
    registers: list[RegisterResult]
    digests: dict[str, tuple[int, str]]
    converge_s: float
    invariant_violations: list[str] = field(default_factory=list)
    old_hosts: list[str] = field(default_factory=list)  # hosts that ran cfg.old_release
    schemas: tuple[int, int] = (0, 0)  # the cluster's schema at the start and at the end
    agent_errors: dict[str, list[str]] = field(default_factory=dict)  # log tracebacks/crashes
    upgrade: tuple[float, float] | None = None  # (last old agent stopped, schema raised) s

    @property
    def linearizability_violations(self) -> int:
        return sum(1 for r in self.registers if not r.ok) + len(
            self.set_result.read_violations)

    def unavailability(self) -> dict[str, float]:
        """Per fault kind: the longest time without an acknowledged write that overlaps a
        fault of that kind (its window extended 5 s past the heal, never past the end of
        the workload)."""
        oks = sorted(o.complete for o in self.ops if o.result == "ok" and o.f in (
            "create", "cas"))
        out: dict[str, float] = {}
        for f in self.faults:
            lo = f.start
            hi = min((f.end if f.end != INF else f.start + f.length) + 5.0,
                     self.config.duration)
            if hi <= lo:
                continue
            times = [lo] + [t for t in oks if lo < t < hi] + [hi]
            after = [t for t in oks if t >= hi]
            if after:
                times[-1] = min(hi, after[0])
            gap = max(b - a for a, b in itertools.pairwise(times))
            for k in f.kinds:
                out[k] = max(out.get(k, 0.0), gap)
        return out

    def gated(self) -> dict[str, int]:
        """The gated creates by outcome."""
        g = [o for o in self.ops if o.f == "create" and o.key.startswith("g-")]
        return {r: sum(1 for o in g if o.result == r) for r in ("ok", "fail", "info")}

    def table_row(self) -> str:
        s = self.set_result
        unavail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.unavailability().items()))
        lab = f"{self.config.managers}+{self.config.workers}"
        if self.old_hosts:
            lab += f" ({', '.join(self.old_hosts)} at {self.config.old_release}"
            if self.upgrade is not None:
                lab += f", upgraded at {self.upgrade[0]:.0f} s, schema raised at " \
                       f"{self.upgrade[1]:.0f} s"
            lab += ")"
        return (f"| {lab} | {self.config.duration:.0f} s"
                f" | {self.config.seed} | {len(self.faults)} | {len(self.ops)} | "
                f"{s.acknowledged} | {len(s.lost)} | {len(s.invented)} | "
                f"{self.linearizability_violations} | {len(self.invariant_violations)} | "
                f"{unavail} | {self.converge_s:.1f} s |")

    def summary(self) -> str:
        s = self.set_result
        by = {r: sum(1 for o in self.ops if o.result == r) for r in ("ok", "fail", "info")}
        lines = [f"faults {len(self.faults)}  ops {len(self.ops)} (ok {by['ok']}, fail "
                 f"{by['fail']}, unknown {by['info']})  creates acknowledged {s.acknowledged}"
                 f" unknown {s.unknown}  lost {len(s.lost)} {s.lost[:5]}  invented "
                 f"{len(s.invented)} {s.invented[:5]}",
                 f"linearizability violations {self.linearizability_violations}  invariant "
                 f"violations {len(self.invariant_violations)}  convergence after the last "
                 f"heal {self.converge_s:.1f} s",
                 "max unavailability (s): " + ", ".join(
                     f"{k} {v:.1f}" for k, v in sorted(self.unavailability().items()))]
        if self.config.gated or self.old_hosts:
            g = self.gated()
            lines.append(f"gated creates: ok {g['ok']}, refused {g['fail']}, unknown "
                         f"{g['info']}; cluster schema {self.schemas[0]} at the start, "
                         f"{self.schemas[1]} at the end"
                         + (f"; old release on {', '.join(self.old_hosts)}"
                            if self.old_hosts else "")
                         + (f"; the last old agent stopped at {self.upgrade[0]:.1f} s, the "
                            f"schema raised by {self.upgrade[1]:.1f} s"
                            if self.upgrade is not None else ""))
        for host, errs in sorted(self.agent_errors.items()):
            lines.append(f"agent {host}: {len(errs)} error(s) in its log, first: {errs[0]}")
        lines += [r.report() for r in self.registers]
        lines += [f"set: {v}" for v in s.read_violations[:10]]
        if len(s.read_violations) > 10:
            lines.append(f"set: ... {len(s.read_violations) - 10} more")
        lines += [f"invariant: {v}" for v in self.invariant_violations]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return (self.set_result.ok and all(r.ok for r in self.registers)
                and not self.invariant_violations)


def schedule(cfg: SuiteConfig) -> list[tuple[float, tuple[str, ...], float, int]]:
    """The seeded plan: (calm before, fault kinds, length, seed of its target choice);
    the kinds come from a shuffled deck, so a run as long as the deck tries each of them."""
    rng = random.Random(cfg.seed)
    plan: list[tuple[float, tuple[str, ...], float, int]] = []
    t = 0.0
    deck: list[str] = []  # every kind once, in a seeded order, before any repeats
    while True:
        calm = rng.uniform(*cfg.calm)
        if not deck:
            deck = list(cfg.kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        kinds: tuple[str, ...] = (kind,)
        if kind != "loss" and "loss" in cfg.kinds and rng.random() < cfg.combine:
            kinds = (kind, "loss")
        length = rng.uniform(1.5, 4.0) if kind.startswith("pause") else rng.uniform(
            *cfg.fault_len)
        if t + calm + length > cfg.duration:
            return plan
        plan.append((calm, kinds, length, rng.randrange(1 << 30)))
        t += calm + length


class Suite:
    def __init__(self, lab: Lab, cfg: SuiteConfig, log: Callable[[str], None] = print) -> None:
        self.lab, self.cfg, self.log = lab, cfg, log
        self.managers = lab.hosts[:cfg.managers]
        self.workers = lab.hosts[cfg.managers:cfg.managers + cfg.workers]
        self.t0 = time.monotonic()
        self.ops: list[Op] = []
        self.faults: list[Fault] = []
        self.down: set[str] = set()  # hosts whose agent is killed or paused
        self.registers = [f"reg-{i}" for i in range(cfg.registers)]
        self.initial: dict[str, tuple[int, int]] = {}
        self.preexisting: list[str] = []  # services there before the history began
        # how each host runs shoal (the lab's executable, or an old release's): restarts
        # with a skewed clock keep it
        self.shoal_of = {h.name: (h._shoal_argv, dict(h._shoal_env))
                         for h in self.managers + self.workers}
        self.old_hosts = [h.name for h in self.managers + self.workers if h._shoal_argv]
        self.schemas = (0, 0)
        self.upgrade: tuple[float, float] | None = None
        self.upgrading: set[str] = set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ HTTP
    async def http(self, host: Host, method: str, path: str, body: Any = None,
                   timeout: float | None = None) -> tuple[int, Any]:
        """(status, JSON); raises aiohttp/OS errors and TimeoutError."""
        conn = aiohttp.UnixConnector(path=str(host.sock))
        async with aiohttp.ClientSession(connector=conn) as session:
            async with asyncio.timeout(timeout or self.cfg.op_timeout):
                async with session.request(method, "http://shoal" + path, json=body) as resp:
                    data = await resp.json(content_type=None)
                    return resp.status, data

    async def call(self, op: Op, host: Host, method: str, path: str, body: Any = None
                   ) -> Any:
        """Run one recorded op; its outcome: ok (2xx), fail (a definite refusal, or the
        request never reached the agent), info (anything that may have happened)."""
        op.node = host.name
        self.ops.append(op)
        try:
            status, data = await self.http(host, method, path, body)
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as e:
            op.result, op.complete, op.error = "fail", self.now(), f"not sent: {e!r}"[:80]
            return None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            op.result, op.error = "info", f"{type(exc).__name__}"
            return None
        err = data.get("error", {}) if isinstance(data, dict) else {}
        if status < 300:
            op.result, op.complete = "ok", self.now()
            return data
        if status == 503 or status >= 500:
            op.result, op.error = "info", f"{status} {err.get('message', '')}"[:100]
            return None
        op.result, op.complete = "fail", self.now()
        op.error = f"{status} {err.get('code', '')}"
        return None

    # ------------------------------------------------------------------ workload
    async def client(self, p: int, end: float) -> None:
        rng = random.Random(self.cfg.seed * 1000 + p)
        seq = 0
        while self.now() < end:
            host = rng.choice(self.managers)
            r = rng.random()
            if r < 0.3:
                seq += 1
                name = f"s-{p}-{seq}"
                spec: dict[str, Any] = {"name": name, "task": {"container": {
                    "command": SPEC_COMMAND}}, "mode": {"replicas": 0}}
                if self.cfg.gated and rng.random() < self.cfg.gated:
                    what, extra = rng.choice(GATED_SPECS)
                    name = spec["name"] = f"g-{p}-{seq}-{what}"
                    spec = _merged(spec, extra)
                await self.call(Op(p, "create", name, None, self.now()), host, "POST",
                                "/v1/services", {"spec": spec})
            elif r < 0.75:
                key = rng.choice(self.registers)
                read = Op(p, "read", key, None, self.now())
                got = await self.call(read, host, "GET", f"/v1/services/{key}")
                if got is None:
                    continue
                read.value = (got["version"], got["replicas"])
                want = rng.randrange(3)
                cas = Op(p, "cas", key, (got["version"], want, None), self.now())
                res = await self.call(cas, rng.choice(self.managers), "POST",
                                      f"/v1/services/{key}/scale",
                                      {"replicas": want, "version": got["version"]})
                if res is not None:
                    cas.value = (got["version"], want, res.get("version"))
            else:
                lst = Op(p, "list", "", None, self.now())
                got = await self.call(lst, host, "GET", "/v1/services")
                if got is not None:
                    lst.value = [s["name"] for s in got]
                    for s in got:  # each register's value, read at the same moment
                        if s["name"] in self.initial:
                            self.ops.append(dataclasses.replace(
                                lst, f="read", key=s["name"],
                                value=(s["version"], s["replicas"])))
            await asyncio.sleep(rng.uniform(0.0, 0.1))

    # ------------------------------------------------------------------ nemesis
    async def leader(self) -> Host | None:
        async def ask(h: Host) -> Host | None:
            if h.name in self.down:
                return None
            with contextlib.suppress(Exception):
                _, info = await self.http(h, "GET", "/v1/info", timeout=2.0)
                if info.get("is_leader"):
                    return h
            return None
        found = [h for h in await asyncio.gather(*(ask(h) for h in self.managers)) if h]
        return found[0] if found else None

    async def inject(self, kinds: tuple[str, ...], rng: random.Random) -> tuple[
            str, Callable[[], Awaitable[None]]]:
        """Start ``kinds``; return (what was done, the heal)."""
        heals: list[Callable[[], Awaitable[None]]] = []
        said: list[str] = []
        everyone = self.managers + self.workers
        for kind in kinds:
            up = [h for h in self.managers if h.name not in self.down]
            leader = await self.leader() if kind.endswith("leader") or kind.startswith(
                "partition") or kind == "disk-full" else None
            if kind in ("kill", "kill-leader", "pause", "pause-leader"):
                target = leader if kind.endswith("leader") and leader else rng.choice(up)
                self.down.add(target.name)
                if kind.startswith("kill"):
                    await asyncio.to_thread(target.kill_agent)
                    heals.append(functools.partial(self._restart, target))
                else:
                    target.pause_agent()
                    heals.append(functools.partial(self._resume, target))
                said.append(f"{kind} {target.name}")
            elif kind.startswith("partition") or kind == "bridge":
                ms = list(self.managers)
                rng.shuffle(ms)
                small = (len(ms) - 1) // 2  # a minority of the managers
                if kind == "bridge":
                    mid = ms[0]
                    a, c = ms[1:1 + small], ms[1 + small:]
                    rest = [h for h in everyone if h not in ms]
                    for w in rest:
                        (a if rng.random() < 0.5 else c).append(w)
                    await asyncio.to_thread(self._cut, a, c)
                    said.append(f"bridge {mid.name} sees {[h.name for h in a]} | "
                                f"{[h.name for h in c]}")
                else:
                    if leader is not None:  # put the leader on the side the kind names
                        ms.remove(leader)
                        ms.insert(0 if kind.endswith("minority") else len(ms) - 1, leader)
                    a, c = ms[:small], ms[small:]
                    for w in [h for h in everyone if h not in ms]:
                        (a if rng.random() < 0.5 else c).append(w)
                    await asyncio.to_thread(self._cut, a, c)
                    said.append(f"{kind} {[h.name for h in a]} | {[h.name for h in c]}"
                                f" (leader {leader.name if leader else '?'})")
                heals.append(self._heal_net)
            elif kind == "disk-full":  # the leader's or another manager's Raft disk
                target = leader if leader is not None and rng.random() < 0.5 else \
                    rng.choice(up)
                await asyncio.to_thread(fill_filesystem, target.data_dir / "raft" / "filler")
                heals.append(functools.partial(self._free_disk, target))
                said.append(f"disk-full {target.name}")
            elif kind == "slow-links":  # tc tbf on the leader and about half the others
                rate = rng.choice(("256kbit", "1mbit", "4mbit"))
                slow = [h for h in everyone if h is leader or rng.random() < 0.5]
                await asyncio.to_thread(self._throttle, slow, rate)
                said.append(f"slow-links {rate} {[h.name for h in slow]}")
                heals.append(self._heal_net)
            elif kind == "clock-skew":  # a manager restarted with its wall clock off
                target = rng.choice(up)
                offset = rng.choice((-1, 1)) * rng.randint(60, 600)
                self.down.add(target.name)
                await asyncio.to_thread(self._restart_skewed, target, offset)
                self.down.discard(target.name)
                heals.append(functools.partial(self._unskew, target))
                said.append(f"clock-skew {target.name} {offset:+d} s")
            elif kind == "loss":
                p = round(rng.uniform(0.1, 0.3), 2)
                await asyncio.to_thread(self._lose, everyone, p)
                said.append(f"loss {p:.0%}")
                heals.append(self._heal_net)

        async def heal() -> None:
            done: list[Callable[[], Awaitable[None]]] = []
            for h in heals:
                if h not in done:  # (two faults may share the network's heal)
                    done.append(h)
                    await h()
        return "; ".join(said), heal

    def _cut(self, a: list[Host], b: list[Host]) -> None:
        for h in a:
            h.block(x.ip for x in b)
        for h in b:
            h.block(x.ip for x in a)

    @staticmethod
    def _lose(hosts: list[Host], p: float) -> None:
        for h in hosts:
            h.lose(p)

    @staticmethod
    def _throttle(hosts: list[Host], rate: str) -> None:
        for h in hosts:
            h.throttle(rate)

    def _restart_skewed(self, h: Host, offset: int) -> None:
        """Restart ``h``'s agent with its wall clock ``offset`` seconds off (the hosts share
        one kernel clock: shoal.node.clock's injection), on the release it runs."""
        argv, env = self.shoal_of[h.name]
        h.kill_agent()
        h.use_shoal(argv, env={**env, "SHOAL_CLOCK_OFFSET": str(offset)})
        h.start_agent()

    async def _unskew(self, h: Host) -> None:
        def restart() -> None:
            h.kill_agent()
            h.use_shoal(*self.shoal_of[h.name])
            h.start_agent()
        while h.name in self.upgrading:  # (the upgrader restarts it: after that)
            await asyncio.sleep(0.1)
        self.down.add(h.name)
        await asyncio.to_thread(restart)
        self.down.discard(h.name)

    async def _heal_net(self) -> None:
        def heal() -> None:
            for h in self.managers + self.workers:
                h.heal()
        await asyncio.to_thread(heal)

    async def _free_disk(self, h: Host) -> None:
        (h.data_dir / "raft" / "filler").unlink(missing_ok=True)

    async def _restart(self, h: Host) -> None:
        await asyncio.to_thread(h.start_agent)
        self.down.discard(h.name)

    async def _resume(self, h: Host) -> None:
        h.resume_agent()
        self.down.discard(h.name)

    async def upgrader(self) -> None:
        """At ``upgrade_at``: each old host's agent stopped (SIGTERM) and started on today's
        code, one after another (a host the nemesis holds down is waited for, and the nemesis
        leaves one being upgraded alone); then wait for the leader to raise the schema."""
        assert self.cfg.upgrade_at is not None
        await asyncio.sleep(max(0.0, self.cfg.upgrade_at - self.now()))
        stopped = 0.0
        for name in self.old_hosts:
            h = next(x for x in self.managers + self.workers if x.name == name)
            while h.name in self.down:
                await asyncio.sleep(0.1)
            self.down.add(h.name)
            self.upgrading.add(h.name)
            self.log(f"[{self.now():7.2f}] upgrade: {h.name} to today's code")
            stopped = self.now()

            def restart(h: Host = h) -> None:
                h.kill_agent(signal.SIGTERM, timeout=60)
                h.use_shoal(None)
                h.start_agent(timeout=60)
            await asyncio.to_thread(restart)
            self.shoal_of[h.name] = (None, {})
            self.down.discard(h.name)
            self.upgrading.discard(h.name)
        while self.now() < self.cfg.duration:
            with contextlib.suppress(Exception):
                if await self.cluster_schema() >= SCHEMA:
                    self.upgrade = (stopped, self.now())
                    self.log(f"[{self.now():7.2f}] upgrade: the cluster writes schema "
                             f"{SCHEMA}")
                    return
            await asyncio.sleep(0.5)

    async def nemesis(self, plan: list[tuple[float, tuple[str, ...], float, int]]) -> None:
        for calm, kinds, length, seed in plan:
            await asyncio.sleep(calm)
            if self.now() + length > self.cfg.duration:
                return  # (restarts took longer than planned: the workload is over)
            f = Fault(kinds, self.now(), length)
            self.faults.append(f)
            f.detail, heal = await self.inject(kinds, random.Random(seed))
            self.log(f"[{f.start:7.2f}] fault: {f.detail} for {length:.1f} s")
            await asyncio.sleep(length)
            await heal()
            f.end = self.now()
            self.log(f"[{f.end:7.2f}] healed")

    # ------------------------------------------------------------------ run
    async def setup(self) -> None:
        h = self.managers[0]
        for key in self.registers:
            status, data = await self.http(h, "POST", "/v1/services", {"spec": {
                "name": key, "task": {"container": {"command": SPEC_COMMAND}},
                "mode": {"replicas": 0}}}, timeout=30)
            assert status == 200, data
            status, data = await self.http(h, "GET", f"/v1/services/{key}", timeout=30)
            self.initial[key] = (data["version"], data["replicas"])
        status, data = await self.http(h, "GET", "/v1/services", timeout=30)
        assert status == 200, data
        self.preexisting = [s["name"] for s in data]
        self.schemas = (await self.cluster_schema(), 0)

    async def cluster_schema(self) -> int:
        """The schema the cluster writes, as a manager of today's code reports it (the
        highest any of them that answers does: the nemesis may hold one down)."""
        new = [h for h in self.managers if h.name not in self.old_hosts + list(
            self.upgrading)] or self.managers

        async def ask(h: Host) -> int:
            _, info = await self.http(h, "GET", "/v1/info", timeout=5)
            return int(info.get("cluster_schema", 0))
        got = await asyncio.gather(*(ask(h) for h in new), return_exceptions=True)
        seen = [g for g in got if isinstance(g, int)]
        if not seen:
            raise TimeoutError("no manager of today's code answered /v1/info")
        return max(seen)

    async def check_upgraded(self) -> list[str]:
        """After an upgrade in place: no schema-11 value acknowledged before the last old
        agent stopped, the schema raised, and every node's record describing its arch (the
        agents' node_describe, once the cluster writes 11) within a minute."""
        out = []
        if self.upgrade is None:
            out.append(f"the cluster's schema is {self.schemas[1]}, not {SCHEMA}, after every "
                       f"node was upgraded")
            return out
        out += [f"{o.key} (a value of schema {gated_schema(o.key)}) acknowledged by {o.node} "
                f"at {o.complete:.1f} s,"
                f" before the last old agent stopped ({self.upgrade[0]:.1f} s)"
                for o in self.ops if o.f == "create" and o.key.startswith("g-")
                and o.result == "ok" and o.complete < self.upgrade[0]
                and self.schemas[0] < gated_schema(o.key)]
        h = self.managers[-1]
        arches: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                _, nodes = await self.http(h, "GET", "/v1/nodes", timeout=10)
                for n in nodes:
                    _, rec = await self.http(h, "GET", f"/v1/nodes/{n['id']}", timeout=10)
                    arches[rec["hostname"]] = rec["platform"]["architecture"]
                if arches and all(arches.values()):
                    return out
            await asyncio.sleep(1.0)
        out.append(f"nodes without an arch a minute after the run: {arches}")
        return out

    async def converge(self) -> tuple[float, dict[str, tuple[int, str]]]:
        """After the last heal: wait until every manager answers a linearizable read and
        all report the same state digest at the same index; returns (seconds, digests)."""
        start = time.monotonic()
        deadline = start + self.cfg.converge_timeout
        seen: dict[str, dict[int, str]] = {h.name: {} for h in self.managers}
        last: dict[str, tuple[int, str]] = {}
        while time.monotonic() < deadline:
            try:
                for h in self.managers:
                    status, _ = await self.http(h, "GET", "/v1/services", timeout=5)
                    assert status == 200
                infos = await asyncio.gather(*(self.http(h, "GET", "/v1/info?digest=1",
                                                         timeout=5) for h in self.managers))
            except (AssertionError, TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.sleep(0.5)
                continue
            for h, (_, info) in zip(self.managers, infos, strict=True):
                d = info["state_digest"]
                seen[h.name][d["index"]] = d["sha256"]
                last[h.name] = (d["index"], d["sha256"])
            if len(set(last.values())) == 1:
                return time.monotonic() - start, last
            await asyncio.sleep(0.2)
        return time.monotonic() - start, last

    async def run(self) -> Report:
        plan = schedule(self.cfg)
        text = [f"{i + 1:2}. after {calm:.1f} s calm: {'+'.join(k)} for {length:.1f} s"
                for i, (calm, k, length, _) in enumerate(plan)]
        self.log(f"fault schedule (seed {self.cfg.seed}):\n  " + "\n  ".join(text))
        await self.setup()
        self.t0 = time.monotonic()
        end = self.cfg.duration
        upgrading = [self.upgrader()] if self.cfg.upgrade_at is not None and \
            self.old_hosts else []
        await asyncio.gather(self.nemesis(plan), *upgrading,
                             *(self.client(p, end) for p in range(self.cfg.clients)))
        for f in self.faults:  # (the nemesis healed each; make sure nothing is left)
            assert f.end != INF
        await self._heal_net()
        problems = []
        for h in self.managers + self.workers:  # the nemesis restarted every agent it killed
            if not h.agent_alive():
                code = h._agent.returncode if h._agent is not None else None
                problems.append(f"the agent of {h.name} exited by itself (status {code})")
                await self._restart(h)
            h.resume_agent()
        healed = self.now()
        converge_s, digests = await self.converge()
        _, final = await self.http(self.managers[0], "GET", "/v1/services", timeout=30)
        names = [s["name"] for s in final]
        set_result = check_set(self.ops, names, preexisting=self.preexisting)
        regs = [check_register(k, [o for o in self.ops if o.key == k and o.f in (
            "read", "cas")], self.initial[k]) for k in self.registers]
        if len(set(digests.values())) != 1 or len(digests) != len(self.managers):
            problems.append(f"managers disagree {converge_s:.0f} s after the last heal "
                            f"(at {healed:.1f} s): {digests}")
        self.schemas = (self.schemas[0], await self.cluster_schema())
        if self.old_hosts and self.cfg.upgrade_at is not None:
            problems += await self.check_upgraded()
        elif self.old_hosts:  # every node of the old release is still in: nothing of 11 goes
            # (an old release that reads them, schema 11 and up, takes them)
            problems += [f"{o.key} (a value of schema {gated_schema(o.key)}) acknowledged by "
                         f"{o.node} while "
                         f"{', '.join(self.old_hosts)} run the old release" for o in self.ops
                         if o.f == "create" and o.key.startswith("g-") and o.result == "ok"
                         and self.schemas[0] < gated_schema(o.key)]
            if self.schemas[1] != self.schemas[0]:
                problems.append(f"the cluster's schema rose from {self.schemas[0]} to "
                                f"{self.schemas[1]} with {', '.join(self.old_hosts)} old")
        report = Report(self.cfg, text, self.faults, self.ops, set_result, regs, digests,
                        converge_s, problems, self.old_hosts, self.schemas,
                        agent_errors(self.managers + self.workers), self.upgrade)
        if self.cfg.history is not None:
            with open(self.cfg.history, "w") as fh:
                for o in sorted(self.ops, key=lambda o: o.invoke):
                    fh.write(json.dumps(dataclasses.asdict(o), default=str) + "\n")
        return report


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys set, maps merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(
            out.get(k), dict) else v
    return out


def agent_errors(hosts: list[Host]) -> dict[str, list[str]]:
    """Per host: the last line of each traceback in its agent log, and CRITICAL lines."""
    out: dict[str, list[str]] = {}
    for h in hosts:
        try:
            lines = h.agent_log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        found, inside = [], False
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                inside = True
            elif inside and line and not line[0].isspace():
                found.append(f"{line[:200]} (line {i + 1})")
                inside = False
            elif " CRITICAL " in line:
                found.append(f"{line[:200]} (line {i + 1})")
        if found:
            out[h.name] = found
    return out


def old_hosts(managers: int, workers: int, k: int) -> list[int]:
    """Indexes of the hosts that run the old release: h1 (it creates the cluster, so the
    cluster starts at the old schema), then a worker, a manager, a worker, ..."""
    ms, ws = list(range(1, managers)), list(range(managers, managers + workers))
    out = [0]
    while len(out) < k and (ms or ws):
        out.append((ws if (ws and len(out) % 2) or not ms else ms).pop(0))
    return out[:k]


def small_disks(lab: Lab, managers: int, size: str = DISK) -> None:
    """Give the first ``managers`` hosts' Raft directories a tmpfs of ``size`` each, before
    their agents start (the disk-full fault fills one). Mounted under the lab's root: the
    lab unmounts them when it closes."""
    for h in lab.hosts[:managers]:
        d = h.data_dir / "raft"
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(d)], check=True)


def run_suite(cfg: SuiteConfig, base_dir: Path | None = None,
              log: Callable[[str], None] = print) -> Report:
    with contextlib.ExitStack() as stack:
        rel = stack.enter_context(oldrelease.old_release(cfg.old_release)) \
            if cfg.old_release else None
        lab = stack.enter_context(Lab(cfg.managers + cfg.workers, base_dir))
        if rel is not None:
            for i in old_hosts(cfg.managers, cfg.workers, cfg.old_nodes):
                lab.hosts[i].use_shoal(rel.argv, rel.env)
            log(f"old release {rel.commit[:12]} on "
                f"{', '.join(h.name for h in lab.hosts if h._shoal_argv)}")
        if "disk-full" in cfg.kinds:
            small_disks(lab, cfg.managers)
        lab.form_cluster(managers=cfg.managers, workers=cfg.workers, timeout=120)
        return asyncio.run(Suite(lab, cfg, log).run())
    raise AssertionError("unreachable")  # (mypy: ExitStack may swallow exceptions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--managers", type=int, default=5)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--history", type=Path, default=None)
    ap.add_argument("--old-release", metavar="COMMIT", default=None,
                    help="run --old-nodes agents on this commit (tests/oldrelease.py), e.g. "
                         "ccf4cf4, the last of schema 10")
    ap.add_argument("--old-nodes", type=int, default=2, metavar="K",
                    help="with --old-release: h1, then a worker, a manager, ... (default 2)")
    ap.add_argument("--gated", type=float, default=None, metavar="SHARE",
                    help="share of the creates with a value only schema 11 reads (default "
                         "0.2 with --old-release, else 0)")
    ap.add_argument("--upgrade-at", type=float, default=None, metavar="SECONDS",
                    help="with --old-release: upgrade the old nodes in place at this time of "
                         "the workload (the schema then rises to today's)")
    args = ap.parse_args(argv)
    gated = args.gated if args.gated is not None else (0.2 if args.old_release else 0.0)
    cfg = SuiteConfig(managers=args.managers, workers=args.workers, duration=args.duration,
                      clients=args.clients, seed=args.seed, history=args.history,
                      old_release=args.old_release, old_nodes=args.old_nodes, gated=gated,
                      upgrade_at=args.upgrade_at)
    def interrupt(_sig: int, _frame: Any) -> None:  # the lab is torn down on the way out
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    report = run_suite(cfg, log=lambda s: print(s, flush=True))
    print(report.summary())
    print("| lab | duration | seed | faults | ops | acknowledged | lost | invented | "
          "lin. violations | invariant violations | max unavailability (s) | convergence |")
    print(report.table_row())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
