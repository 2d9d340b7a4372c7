"""The replicated orchestrator under random histories: scales, updates (stop-first and
start-first), rollbacks, nodes going down and coming back, drains and pauses, tasks failing
or exiting, preparing (an image pull) or health-checked (starting, then healthy or
unhealthy and stopped), restart policies, a per-node limit (lowered by updates), history
limits, leader batches cut short, with and without the leader's PassIndex, at schema 8, 9
and 10 (with GPUs: nodes with 1-3 named ones, tasks reserving 1 or 2) and with the schema
raised on the way; a global service at schema 11 too (nodes of two architectures or none
reported, an architecture constraint, nodes describing themselves anew). The state machine,
the leader's passes (node/leader.py plan_pass, with node liveness) and fake agents in one
process: no network, no root. Seeded: a failure names its seed, and ``python
tests/test_orchestrator_fuzz.py SEED SCHEMA [global]`` prints its history.

What must hold in every pass: the leader's PassIndex changes nothing (the same ops as a
pass over the whole state); no task is made in a slot the same pass removes, nor (schema 9)
under a new slot number while enough slots are in use — a slot keeps its number through
restarts, lost nodes and rollouts, and new numbers are the lowest free ones — nor
(stop-first) beside a task still stopping; a scale-down leaves no node with 2 more of the
kept slots than one that lost a slot; after a
batch committed whole, a slot has at most one old and one new live task; the tasks that hold
a node's GPUs never reserve more than it has. And once every
node is back, active and the agents report everything: the leader goes quiet; as many slots
are in use as replicas (schema 8: all within 1..replicas); a slot has one live task (two
while a start-first update pairs them), a node no more than the per-node limit, a slot no
more ended tasks than the history limit; a service with the default restart policy and no
per-node limit runs all its replicas, its update done (unless a task waits for GPUs no
node has free: a rollout waits for it, as Swarm's).

A global service goes through the same histories with nodes joining, node labels changing
under a placement constraint, and a memory reservation a start-first update may find no
room for beside the old task: in every pass no task is made on a node the service may not
run on (not ready, not active, failing the constraint, or marked down by the same pass),
nor (stop-first) beside one still stopping, and after a whole batch a node has at most one
old and one new live task; at the end each node the service may run on has its one live
task (two during a start-first update; PENDING where the node has too few GPUs) and no
other node has any. And several services sharing nodes (two global ones, a replicated one,
a global job, reserving memory and GPUs): no node's resources reserved beyond what it has.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from shoal.node.leader import PassIndex, plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.scheduler import holds, unsatisfied
from shoal.raft import generic
from shoal.raft.models import (
    Health,
    Node,
    NodeAvailability,
    NodeRole,
    NodeState,
    Task,
    TaskState,
    to_dict,
)
from shoal.raft.schema import GENERIC, PLATFORM, SLOT_HOLES
from shoal.raft.state import ClusterState

STEPS = 40
SEEDS = 100
ARCHES = ("x86_64", "aarch64", "")  # ("": not reported)
ARCH_CONSTRAINTS = [[], ["node.platform.arch==aarch64"], ["node.platform.arch!=x86_64"],
                    ["node.platform.arch==AARCH64", "node.labels.zone==a"]]


def _gpus(node: Node) -> int:
    return generic.units(node.generic_resources.get("GPU", []))


@dataclass
class Run:
    """One random history (``raise_schema``: start at 8, raise to 9 on the way; ``glob``:
    a global service)."""

    seed: int
    schema: int
    raise_schema: bool = False
    glob: bool = False
    trace: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.r = random.Random(self.seed)
        self.ids = 0
        self.now = 2.0
        self.down: set[str] = set()
        st = self.st = ClusterState()
        assert "ok" in st.apply({"op": "cluster_schema", "schema": self.schema})
        self.restart = r.choice([{}, {"condition": "none"},
                                 {"condition": "on-failure", "max_attempts": 2, "delay": 1.0},
                                 {"condition": "any", "delay": 0.0},
                                 {"condition": "any", "max_attempts": 1, "delay": 2.0}])
        self.order = r.choice(["stop-first", "start-first"])
        self.max_per_node = r.choice([0, 0, 2, 3])
        self.parallelism = r.choice([0, 1, 2])
        self.command = 9
        self.index = PassIndex() if r.random() < 0.5 else None
        self.config = OrchestratorConfig(task_history=r.choice([0, 1, 3]))
        # (global: a zone constraint, and a reservation that fits once per node or not)
        self.constraints = r.choice([[], ["node.labels.zone==a"], ["node.labels.zone!=b"]]
                                    if self.schema < PLATFORM else ARCH_CONSTRAINTS)
        self.reserve = r.choice([0, 0, 300, 600]) << 20
        self.checked = r.random() < 0.3  # (a health check: up = healthy, not just running)
        # (schema 10: GPUs, 1-3 named ones a node, 1 or 2 a task)
        self.gpus = r.choice([0, 1, 1, 2]) if self.schema >= GENERIC else 0
        self.nodes = 0
        for _ in range(r.randint(1, 4)):
            self.add_node(1.0)
        assert "ok" in st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                                 "spec": self.spec(r.randint(1, 6))})

    def add_node(self, now: float) -> None:
        self.nodes += 1
        i = self.nodes
        assert "ok" in self.st.apply({"op": "node_add", "now": now, "node": to_dict(Node(
            id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
            raft_port=2378, role=NodeRole.WORKER, state=NodeState.READY,
            labels={"zone": self.r.choice("ab")}, memory_bytes=1 << 30,
            generic_resources={"GPU": [f"g{j}" for j in range(self.r.randint(1, 3))]}
            if self.gpus else {},
            # (schema 11: its architecture, or none reported: joined below 11)
            arch=self.r.choice(ARCHES) if self.schema >= PLATFORM else ""))})

    def spec(self, replicas: int) -> dict[str, Any]:
        update = {"order": self.order, "parallelism": self.parallelism,
                  "failure_action": "continue", "monitor": 1.0}
        container: dict[str, Any] = {"command": ["sleep", str(self.command)]}
        if self.checked:
            container["healthcheck"] = {"command": "true", "interval": 1.0}
        gpus = {"generic_resources": {"gpu": self.gpus}} if self.gpus else {}
        if self.glob:
            return {"name": "web", "mode": {"type": "global"},
                    "task": {"container": container,
                             "restart": self.restart,
                             "placement": {"constraints": self.constraints},
                             "resources": {"reservations": {"memory": self.reserve,
                                                            **gpus}}},
                    "update": update}
        return {"name": "web", "mode": {"replicas": replicas},
                "task": {"container": container,
                         "restart": self.restart,
                         "placement": {"max_replicas": self.max_per_node},
                         "resources": {"reservations": gpus}},
                "update": update}

    def eligible(self, snap: Any, marked: dict[str, str] | None = None) -> set[str]:
        """The nodes the global service may run a task on, as the snapshot says (with
        ``marked``, the node states a pass sets: node id → "ready" / "down")."""
        constraints = tuple(snap.services["s1"].spec.task.placement.constraints)
        marked = marked or {}
        return {n.id for n in snap.nodes.values()
                if marked.get(n.id, n.state.value) == NodeState.READY.value
                and n.availability is NodeAvailability.ACTIVE
                and unsatisfied(n, constraints) is None}

    def new_id(self) -> str:
        self.ids += 1
        return f"t{self.ids:05d}"

    def in_use(self) -> set[int]:
        return {t.slot for t in self.st.tasks.values() if t.desired_state < TaskState.REMOVE}

    def leader_pass(self, cut: bool = False) -> list[Any]:
        st, now = self.st, self.now
        snap = st.snapshot()
        seen = {n: now for n in snap.nodes if n not in self.down}
        full: list[Any] | None = None
        if self.index is not None:  # (the pass without the index: the same ops)
            ids = self.ids
            full, _ = plan_pass(snap, seen, now, now, self.config, liveness=True,
                                new_id=self.new_id)
            self.ids = ids
        ops, _ = plan_pass(snap, seen, now, now, self.config, liveness=True,
                           index=self.index, new_id=self.new_id)
        assert full is None or sorted(map(repr, full)) == sorted(map(repr, ops)), (
            self.seed, "the pass with the PassIndex differs from the whole one", full, ops)
        if self.glob:
            self._global_creates(snap, ops)
        else:
            self._replicated_creates(snap, ops)
        whole = not (cut and len(ops) > 1)
        if not whole:  # (a batch the leader did not get committed whole)
            ops = ops[:self.r.randint(1, len(ops) - 1)]
        self.trace.append(("pass", now, [op if op[0] != "create" else ("create", op[1]["slot"])
                                         for op in ops]))
        if ops:
            assert "ok" in st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
        if whole:
            self._one_old_and_one_new_per_slot()
        self._no_node_over_its_gpus()
        return ops

    def _no_node_over_its_gpus(self) -> None:
        """The tasks that hold their node's GPUs (placed, not ended) never reserve more
        than it has."""
        held: dict[str, int] = {}
        for t in self.st.tasks.values():
            if t.node_id and TaskState.ASSIGNED <= t.status.state < TaskState.COMPLETE:
                n = t.spec.resources.reservations.generic_resources.get("gpu", 0)
                held[t.node_id] = held.get(t.node_id, 0) + n
        for nid, n in held.items():
            have = _gpus(self.st.nodes[nid])
            assert n <= have, (self.seed, "a node's GPUs reserved beyond what it has", nid,
                               n, have)

    def _replicated_creates(self, snap: Any, ops: list[Any]) -> None:
        removed = {snap.tasks[op[1]].slot for op in ops if op[0] == "desired"
                   and op[2] == int(TaskState.REMOVE) and op[1] in snap.tasks}
        created = [op[1]["slot"] for op in ops if op[0] == "create"]
        assert not set(created) & removed, (self.seed, "a task made in a removed slot", ops)
        if snap.cluster.schema >= SLOT_HOLES:
            before = self.in_use()
            replicas = snap.services["s1"].spec.mode.replicas
            fresh = sorted(s for s in created if s not in before)
            assert not fresh or len(before) < replicas, (
                self.seed, "a new slot number while enough are in use", fresh, before)
            free = [n for n in range(1, replicas + len(before) + 1) if n not in before]
            assert set(fresh) <= set(free[:replicas - len(before)]), (
                self.seed, "a scale-up that does not fill the lowest free numbers", fresh,
                sorted(before))
        if self.order == "stop-first":
            self._no_start_beside_a_stopping_task(snap, ops, set(created), lambda t: t.slot)
        if removed:
            self._balanced(snap, ops, removed)

    def _global_creates(self, snap: Any, ops: list[Any]) -> None:
        marked = {op[1]: op[2] for op in ops if op[0] == "node_state"}
        eligible = self.eligible(snap, marked)
        on = [op[1].get("node_id", "") for op in ops if op[0] == "create"]
        assert all(n in eligible for n in on), (
            self.seed, "a global task made on a node it may not run on", on, eligible, ops)
        assert len(on) == len(set(on)), (self.seed, "two tasks made on one node", on)
        if self.order == "stop-first":
            self._no_start_beside_a_stopping_task(snap, ops, set(on), lambda t: t.node_id)

    def _no_start_beside_a_stopping_task(self, snap: Any, ops: list[Any], places: set[Any],
                                         place: Any) -> None:
        """Stop-first: a slot's (global: a node's) new task waits for the old one told to
        stop (still running on a ready node, for up to 60 s)."""
        orphaned = {op[1] for op in ops if op[0] == "orphan"}
        for t in snap.tasks.values():
            node = snap.nodes.get(t.node_id)
            assert not (place(t) in places and node is not None and t.node_id not in self.down
                        and node.state is NodeState.READY and not t.alive
                        and t.status.state >= TaskState.ASSIGNED  # (a waiting one never ran)
                        and not t.status.state.terminal and self.now < t.updated_at + 60
                        and t.id not in orphaned), (
                self.seed, "a task made beside one still stopping", place(t), t.id)

    def _balanced(self, snap: Any, ops: list[Any], removed: set[int]) -> None:
        """A scale-down leaves no node with 2 more of the kept slots than a node that lost
        one (among slots with one live placed task on a node neither down nor drained)."""
        if snap.cluster.schema < SLOT_HOLES:
            return
        down = {op[1] for op in ops if op[0] == "node_state" and op[2] == "down"} | \
            {n.id for n in snap.nodes.values() if n.state is NodeState.DOWN}
        live: dict[int, list[Task]] = {}
        for t in snap.tasks.values():
            if t.alive and t.slot >= 1:
                live.setdefault(t.slot, []).append(t)
        on = {s: ts[0].node_id for s, ts in live.items() if len(ts) == 1 and ts[0].node_id
              and ts[0].node_id not in down
              and snap.nodes[ts[0].node_id].availability.value != "drain"}
        kept: dict[str, int] = {}
        for s, n in on.items():
            if s not in removed:
                kept[n] = kept.get(n, 0) + 1
        for gone in removed & on.keys():
            lighter = kept.get(on[gone], 0)
            assert all(lighter >= kept[n] - 1 for s, n in on.items() if s not in removed), (
                self.seed, "an unbalanced scale-down", gone, on, kept)

    def _one_old_and_one_new_per_slot(self) -> None:
        from shoal.node.rollout import outdated

        svc, seen = self.st.services["s1"], set()
        for t in self.st.tasks.values():
            if t.alive and t.node_id not in self.down:
                key = (t.node_id if self.glob else t.slot,
                       outdated(t, svc.spec.task, self.st.nodes.get(t.node_id)))
                assert key not in seen, (self.seed, "two old or two new live tasks", key)
                seen.add(key)

    def agents(self, p: float = 0.7, fail: float = 0.1) -> None:
        """Each placed task's node reports (with probability ``p``): a wanted one starts
        (sometimes preparing first, as an image pull), with a health check starting before
        it turns healthy or unhealthy (then the node stops it: failed), and sometimes
        fails or exits; an unwanted one stops."""
        r = self.r
        for t in sorted(self.st.tasks.values(), key=lambda t: t.id):
            if t.status.state.terminal or not t.node_id or t.node_id in self.down or \
                    r.random() > p or (t.alive and t.status.state < TaskState.ASSIGNED):
                continue  # (a global task waiting on its node, PENDING, is not started)
            checked = bool(t.spec.container.healthcheck.command)
            health, now = "", t.status.health
            if not t.alive:
                state = TaskState.SHUTDOWN
            elif t.status.state < TaskState.PREPARING and r.random() < fail * 2:
                state = TaskState.PREPARING
            elif t.status.state < TaskState.RUNNING:
                state, health = TaskState.RUNNING, "starting" if checked else ""
            elif now is Health.UNHEALTHY:
                state = TaskState.FAILED
            elif now is Health.STARTING and r.random() < 0.7:
                state = TaskState.RUNNING
                health = "unhealthy" if r.random() < fail else "healthy"
            elif r.random() < fail and now is not Health.STARTING:
                state = r.choice([TaskState.FAILED, TaskState.COMPLETE])
            else:
                continue
            self.st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                           "now": self.now, "status": {
                               "state": int(state), "timestamp": self.now, "health": health,
                               "exit_code": 0 if state is TaskState.COMPLETE else 1}})

    def history(self) -> None:
        r, st = self.r, self.st
        raise_at = r.randint(1, STEPS - 1) if self.raise_schema else -1
        replicas = st.services["s1"].spec.mode.replicas
        for step in range(STEPS):
            self.now += r.choice([0.5, 1.0, 3.0, 10.0])
            if step == raise_at:
                assert "ok" in st.apply({"op": "cluster_schema", "schema": SLOT_HOLES})
                self.trace.append(("schema", SLOT_HOLES))
            ev = r.random()
            if ev < 0.25 and self.glob:  # (global: nodes join, labels change)
                if r.random() < 0.3 and self.nodes < 6:
                    self.add_node(self.now)
                    self.trace.append(("join", f"n{self.nodes}"))
                elif self.schema >= PLATFORM and r.random() < 0.5:  # (its agent describes it)
                    n, arch = f"n{r.randint(1, self.nodes)}", r.choice(ARCHES[:2])
                    assert "ok" in st.apply({"op": "node_describe", "id": n, "now": self.now,
                                             "arch": arch, "memory_bytes": 1 << 30,
                                             "cpus": 0.0})
                    self.trace.append(("arch", n, arch))
                else:
                    n, zone = f"n{r.randint(1, self.nodes)}", r.choice("ab")
                    st.apply({"op": "node_update", "id": n, "now": self.now,
                              "labels": {"zone": zone}})
                    self.trace.append(("zone", n, zone))
            elif ev < 0.25:
                replicas = r.randint(0, 7)
                st.apply({"op": "service_update", "id": "s1", "now": self.now,
                          "replicas": replicas})
                self.trace.append(("scale", replicas))
            elif ev < 0.33:
                self.command += 1
                replicas = r.randint(0, 7)
                if self.glob and r.random() < 0.3:
                    self.constraints = r.choice([[], ["node.labels.zone==a"]]
                                                if self.schema < PLATFORM else ARCH_CONSTRAINTS)
                    self.reserve = r.choice([0, 600]) << 20
                elif r.random() < 0.3:  # (a lowered limit moves the tasks over it)
                    self.max_per_node = r.choice([0, 1, 2, 3])
                st.apply({"op": "service_update", "id": "s1", "now": self.now,
                          "spec": self.spec(replicas)})
                self.trace.append(("update", replicas))
            elif ev < 0.38:
                prev = st.services["s1"].previous_spec
                st.apply({"op": "service_update", "id": "s1", "now": self.now,
                          "rollback": True,
                          "spec": to_dict(prev) if prev else self.spec(replicas)})
                replicas = st.services["s1"].spec.mode.replicas
                self.trace.append(("rollback", replicas))
            elif ev < 0.45 and self.nodes > 1:
                n = f"n{r.randint(1, self.nodes)}"
                self.down ^= {n}
                self.trace.append(("down" if n in self.down else "up", n))
            elif ev < 0.50:
                n, av = f"n{r.randint(1, self.nodes)}", r.choice(["active", "drain", "pause"])
                st.apply({"op": "node_update", "id": n, "now": self.now, "availability": av})
                self.trace.append(("availability", n, av))
            for _ in range(r.randint(1, 3)):
                self.leader_pass(cut=r.random() < 0.15)
                self.agents()

    def settle(self) -> bool:
        """Every node back and active, every report made: does the leader go quiet?"""
        self.down.clear()
        for n in list(self.st.nodes):
            self.st.apply({"op": "node_update", "id": n, "now": self.now,
                           "availability": "active"})
        for i in range(200):
            self.now += 2.0
            ops = self.leader_pass()
            self.agents(p=1.0, fail=0.0)
            if not ops and i > 5:
                self.now += 100.0  # (past any restart delay and monitor)
                if not self.leader_pass():
                    return True
        return False


def _check(run: Run) -> None:
    run.history()
    assert run.settle(), (run.seed, "the leader never went quiet")
    if run.glob:
        _check_global(run)
        return
    svc = run.st.services["s1"]
    replicas = svc.spec.mode.replicas
    live = [t for t in run.st.tasks.values() if t.alive]
    per_slot: dict[int, list[Task]] = {}
    for t in live:
        per_slot.setdefault(t.slot, []).append(t)
    rolling = svc.update_status.state in ("updating", "rollback_started")
    assert all(len(ts) <= (2 if rolling and run.order == "start-first" else 1)
               for ts in per_slot.values()), (run.seed, "too many live tasks in a slot",
                                               {s: len(ts) for s, ts in per_slot.items()})
    if run.st.cluster.schema >= SLOT_HOLES:
        assert len(run.in_use()) == replicas, (run.seed, sorted(run.in_use()), replicas)
        assert set(per_slot) <= run.in_use(), run.seed
    else:
        assert set(per_slot) <= set(range(1, replicas + 1)), (run.seed, sorted(per_slot))
    on: dict[str, int] = {}
    for t in live:
        if t.node_id:  # (placed)
            on[t.node_id] = on.get(t.node_id, 0) + 1
    limit = svc.spec.task.placement.max_replicas  # (a rollback may have restored another)
    assert not limit or max(on.values(), default=0) <= limit, (
        run.seed, "more live tasks on a node than the limit", on)
    _history_kept(run, lambda t: t.slot)
    if not run.restart and not limit:
        wanted = run.in_use() if run.st.cluster.schema >= SLOT_HOLES else \
            set(range(1, replicas + 1))
        assert set(per_slot) == wanted, (run.seed, sorted(per_slot), sorted(wanted))
        waiting = any(t.status.state is TaskState.PENDING for t in live)  # (too few GPUs)
        assert not rolling or (waiting and run.gpus), (run.seed, svc.update_status)


def _history_kept(run: Run, place: Any) -> None:
    """No slot (global: node) keeps more ended tasks than the history limit."""
    svc = run.st.services["s1"]
    history = max(run.config.task_history, svc.spec.task.restart.max_attempts + 1, 1)
    ended: dict[Any, int] = {}
    for t in run.st.tasks.values():
        if t.status.state.terminal:
            ended[place(t)] = ended.get(place(t), 0) + 1
    assert max(ended.values(), default=0) <= history, (run.seed, "history kept", ended)


def _check_global(run: Run) -> None:
    svc = run.st.services["s1"]
    eligible = run.eligible(run.st.snapshot())
    rolling = svc.update_status.state in ("updating", "rollback_started")
    per_node: dict[str, list[Task]] = {}
    for t in run.st.tasks.values():
        if t.alive:
            per_node.setdefault(t.node_id, []).append(t)
    assert all(len(ts) <= (2 if rolling and run.order == "start-first" else 1)
               for ts in per_node.values()), (run.seed, "too many live tasks on a node",
                                               {n: len(ts) for n, ts in per_node.items()})
    assert set(per_node) <= eligible, (run.seed, "live tasks where the service may not run",
                                       sorted(per_node), sorted(eligible))
    _history_kept(run, lambda t: t.node_id)
    if not run.restart:
        assert set(per_node) == eligible, (run.seed, sorted(per_node), sorted(eligible))
        need = svc.spec.task.resources.reservations.generic_resources.get("gpu", 0)
        short = {nid for nid in per_node if need > _gpus(run.st.nodes[nid])}
        for nid, ts in per_node.items():
            assert all(t.status.state is (TaskState.PENDING if nid in short else
                                          TaskState.RUNNING) for t in ts), (
                run.seed, "a global task not running at the end (or not waiting on a node "
                "with too few GPUs)", nid)
        # (a task that can never run keeps a rollout going, as Swarm's updater waits)
        assert not rolling or short, (run.seed, svc.update_status)


@pytest.mark.parametrize("schema", [8, 9, 10, 11])
def test_random_histories_of_a_global_service_converge(schema: int) -> None:
    for seed in range(SEEDS):
        run = Run(seed, schema, glob=True)
        try:
            _check(run)
        except AssertionError:
            print(f"seed {seed}, schema {schema}, global; its history:", *run.trace[-40:],
                  sep="\n")
            raise


@pytest.mark.parametrize("schema", [8, 9, 10, "8→9"])
def test_random_histories_converge_and_keep_slot_numbers(schema: int | str) -> None:
    for seed in range(SEEDS):
        run = Run(seed, 8 if schema == "8→9" else int(schema), raise_schema=schema == "8→9")
        try:
            _check(run)
        except AssertionError:
            print(f"seed {seed}, schema {schema}; its history:", *run.trace[-40:], sep="\n")
            raise


if __name__ == "__main__":  # python tests/test_orchestrator_fuzz.py SEED SCHEMA [global]
    one = Run(int(sys.argv[1]), int(sys.argv[2]), glob=sys.argv[3:] == ["global"])
    try:
        _check(one)
    finally:
        print(*one.trace, sep="\n")


# --------------------------------------------------------------- several services, one pool
def _shared_history(seed: int, steps: int = 40) -> None:
    """Two global services, a replicated one and a global job on 1-3 nodes of 1 GiB and 1-2
    GPUs, each reserving memory and GPUs at random (updates change them, stop-first or
    start-first), nodes down and back, drained and paused, tasks failing or exiting, batches
    cut short. After every pass the tasks that hold a node's resources (``holds``) never
    reserve more memory or GPUs than it has, and the PassIndex's pass equals the whole one."""
    r = random.Random(seed)
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": GENERIC})
    nodes = r.randint(1, 3)
    for i in range(1, nodes + 1):
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(Node(
            id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=1, raft_port=2,
            role=NodeRole.WORKER, state=NodeState.READY, memory_bytes=1 << 30,
            generic_resources={"GPU": [f"g{j}" for j in range(r.randint(1, 2))]}))})
    count = 0

    def new_id() -> str:
        nonlocal count
        count += 1
        return f"t{count:05d}"

    def spec(name: str, mode: dict[str, Any], version: int) -> dict[str, Any]:
        gpus = r.choice([0, 1, 1, 2])
        need = {"memory": r.choice([0, 400, 700]) << 20,
                **({"generic_resources": {"gpu": gpus}} if gpus else {})}
        return {"name": name, "mode": mode,
                "task": {"container": {"command": ["v", str(version)]},
                         "restart": {"delay": 0.0}, "resources": {"reservations": need}},
                "update": {"order": r.choice(["stop-first", "start-first"]),
                           "parallelism": r.choice([0, 1]), "monitor": 0.0,
                           "failure_action": "continue"}}

    services: list[tuple[str, str, dict[str, Any]]] = [
        ("s1", "ga", {"type": "global"}), ("s2", "gb", {"type": "global"}),
                ("s3", "rep", {"replicas": r.randint(1, 4)}), ("s4", "job", {"type": "global-job"})]
    for sid, name, mode in services:
        assert "ok" in st.apply({"op": "service_create", "id": sid, "now": 1.0,
                                 "spec": spec(name, mode, 0)})
    index = PassIndex() if r.random() < 0.5 else None
    config = OrchestratorConfig(task_history=1)
    now, down, version = 2.0, set[str](), 0
    for step in range(steps):
        now += r.choice([0.5, 1.0, 5.0, 70.0])
        ev = r.random()
        if ev < 0.15:
            sid, name, mode = r.choice(services)
            version += 1
            st.apply({"op": "service_update", "id": sid, "now": now,
                      "spec": spec(name, mode, version)})
        elif ev < 0.22 and nodes > 1:
            down ^= {f"n{r.randint(1, nodes)}"}
        elif ev < 0.27:
            st.apply({"op": "node_update", "id": f"n{r.randint(1, nodes)}", "now": now,
                      "availability": r.choice(["active", "active", "drain", "pause"])})
        for _ in range(r.randint(1, 3)):
            snap = st.snapshot()
            seen = {n: now for n in snap.nodes if n not in down}
            whole: list[Any] | None = None
            if index is not None:
                before = count
                whole, _ = plan_pass(snap, seen, now, now, config, new_id=new_id)
                count = before
            ops, _ = plan_pass(snap, seen, now, now, config, index=index, new_id=new_id)
            assert whole is None or sorted(map(repr, whole)) == sorted(map(repr, ops)), (
                seed, "the pass with the PassIndex differs from the whole one", whole, ops)
            if len(ops) > 1 and r.random() < 0.15:
                ops = ops[:r.randint(1, len(ops) - 1)]
            if ops:
                assert "ok" in st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
            memory: dict[str, int] = {}
            gpus: dict[str, int] = {}
            for t in st.tasks.values():
                if holds(t):
                    need = t.spec.resources.reservations
                    memory[t.node_id] = memory.get(t.node_id, 0) + need.memory
                    gpus[t.node_id] = gpus.get(t.node_id, 0) + \
                        need.generic_resources.get("gpu", 0)
            for nid, node in st.nodes.items():
                assert memory.get(nid, 0) <= node.memory_bytes, (seed, step, "memory", memory)
                assert gpus.get(nid, 0) <= _gpus(node), (seed, step, "GPUs", gpus)
            for t in sorted(st.tasks.values(), key=lambda t: t.id):
                if t.status.state.terminal or not t.node_id or t.node_id in down or \
                        r.random() > 0.7 or (t.alive and t.status.state < TaskState.ASSIGNED):
                    continue
                if not t.alive:
                    state = TaskState.SHUTDOWN
                elif t.status.state < TaskState.RUNNING:
                    state = TaskState.RUNNING
                elif r.random() < 0.1:
                    state = r.choice([TaskState.FAILED, TaskState.COMPLETE])
                else:
                    continue
                st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                          "now": now, "status": {"state": int(state), "timestamp": now,
                                                 "exit_code": 1}})


def test_services_sharing_nodes_never_reserve_more_than_a_node_has() -> None:
    for seed in range(SEEDS * 2):
        _shared_history(seed)
