"""The control plane in one process: no root, no network, no Raft.

`service create` (node/control/services.py) → the leader's plan (node/leader.py: orchestrator
and scheduler) → the worker's reconciler (node/worker.py) → the runtime's fake controller →
the RUNNING report → the `service ps` view, through the code paths the agent uses, on the
in-memory store (node/source.py MemoryStore: the same ClusterState state machine). Also the
reconciler's pure step function and the quorum rule of demotion, table-tested.

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.roles import even_managers_warning, quorum_after_removal
from shoal.node.control.services import Services
from shoal.node.errors import Conflict, Forbidden, NotManager
from shoal.node.feed import FeedConfig, StateFeed
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.pki import CertInfo
from shoal.node.security import Security
from shoal.node.source import MemoryStore, StateSource
from shoal.node.transfer import Transfer
from shoal.node.worker import (
    Action,
    BackwardsTransition,
    Step,
    Worker,
    _forward,
    default_hostname,
    next_step,
)
from shoal.raft.models import Node, NodeRole, TaskState, TaskStatus, task_from_dict, to_dict
from shoal.raft.schema import SCHEMA
from shoal.runtime.images import ImageConfig, ImageStore
from shoal.runtime.testing import FakeController

ADDR = "10.0.0.1"


class Cluster:
    """One manager node wired like the agent wires it, on a MemoryStore."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = MemoryStore(self_addr=f"{ADDR}:2378")
        self.ctx = NodeContext(AgentConfig(data_dir=tmp_path, advertise_addr=ADDR), "h1")
        self.ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager",
                                  raft_password="", voters=[f"{ADDR}:2378"]),
                     self.store, self.store)
        self.runtime = FakeController()
        security = Security(self.ctx)
        self.transfer = Transfer(self.ctx, security, self.runtime, ImageStore(tmp_path / "img"))
        self.services = Services(self.ctx, self.transfer)
        self.leader = LeaderLoop(self.store, {}, OrchestratorConfig(), asyncio.Event())
        self.pulls: dict[str, asyncio.Event] = {}
        self.worker = Worker("n1", self.store, self.runtime, asyncio.Event(),
                             pull_image=self._pull)

    async def _pull(self, ref: str) -> None:
        """A peer's image arrives when the test sets its event."""
        await self.pulls.setdefault(ref, asyncio.Event()).wait()
        self.runtime.image_configs[ref] = ImageConfig()

    async def boot(self) -> None:
        await self.ctx.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                                "worker_secret": "", "manager_secret": "", "digest": "",
                                "schema": SCHEMA})
        await self.ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
            id="n1", hostname="h1", addr=ADDR, api_port=2377, raft_port=2378,
            role=NodeRole.MANAGER, memory_bytes=1 << 33, cpus=4.0))})

    def states(self, service: str) -> list[TaskState]:
        snap = self.store.snapshot()
        svc = snap.service_by_name(service)
        assert svc is not None
        return sorted(t.status.state for t in snap.tasks_of(svc.id))


async def test_service_create_reaches_running_and_service_ps_through_the_agents_paths(
        tmp_path: Path) -> None:
    """A created service is planned by the leader, started by the worker on the fake runtime,
    reported RUNNING and shown by `service ps` with its pid and live usage."""
    c = Cluster(tmp_path)
    await c.boot()
    out = await c.services.create_service({
        "name": "web", "mode": {"replicas": 2},
        "task": {"container": {"command": ["sleep", "100"], "hostname": "webhost"}}})
    assert out["name"] == "web"
    assert c.states("web") == []

    await c.leader.one_pass()  # orchestrator: 2 tasks; scheduler: both on n1
    snap = c.store.snapshot()
    assert [(t.node_id, t.status.state) for t in snap.tasks.values()] == \
        [("n1", TaskState.ASSIGNED)] * 2

    await c.worker.reconcile()
    await c.worker.wait_started()
    assert c.states("web") == [TaskState.RUNNING] * 2
    running = c.runtime.tasks()
    assert sorted(running) == sorted(snap.tasks)
    assert all(c.runtime.config(tid).command == ("sleep", "100") for tid in running)
    assert all(c.runtime.config(tid).hostname == "webhost" for tid in running)

    ps = await c.services.tasks("web")
    assert [t["state"] for t in ps] == ["running", "running"]
    assert sorted(t["pid"] for t in ps) == sorted(rt.pid for rt in running.values())
    assert all(t["usage"]["memory_bytes"] == 1 << 20 for t in ps)
    # a second pass has nothing new to report or start
    index = c.store.index
    await c.worker.reconcile()
    await c.worker.wait_started()
    assert c.store.index == index


async def test_the_worker_reports_an_exit_and_the_leader_replaces_the_task(
        tmp_path: Path) -> None:
    """A task that exits non-zero is reported FAILED; the leader's next pass starts a
    replacement, which the worker runs: the service is back at its replica count."""
    c = Cluster(tmp_path)
    await c.boot()
    await c.services.create_service({"name": "web", "command": ["sleep", "100"],
                                     "replicas": 1, "restart_delay": 0})
    await c.leader.one_pass()
    await c.worker.reconcile()
    await c.worker.wait_started()
    (first,) = c.runtime.tasks()
    c.runtime.exit(first, 3)
    await c.worker.reconcile()
    assert c.store.snapshot().tasks[first].status.state is TaskState.FAILED
    await c.leader.one_pass()
    await c.worker.reconcile()
    await c.worker.wait_started()
    states = {t.id: t.status.state for t in c.store.snapshot().tasks.values()}
    assert states[first] is TaskState.FAILED
    assert sorted(s for tid, s in states.items() if tid != first) == [TaskState.RUNNING]


async def test_a_slow_image_pull_does_not_hold_back_other_tasks(tmp_path: Path) -> None:
    """While one task waits for its image from a peer, the other tasks of the node start
    and are reported RUNNING; the waiting one follows once its image is there."""
    c = Cluster(tmp_path)
    await c.boot()
    await c.services.create_service({"name": "slow", "image": "big:1",
                                     "command": ["sleep", "100"], "replicas": 1})
    await c.services.create_service({"name": "fast", "command": ["sleep", "100"],
                                     "replicas": 2})
    await c.leader.one_pass()
    await c.worker.reconcile()
    for _ in range(100):  # the fast starts report on their own, the pull still waits
        if c.states("fast") == [TaskState.RUNNING] * 2:
            break
        await asyncio.sleep(0.01)
    assert c.states("fast") == [TaskState.RUNNING] * 2
    assert c.states("slow") == [TaskState.ASSIGNED]
    await c.worker.reconcile()  # a pass meanwhile does not start the pulling task again
    assert len(c.worker._starting) == 1
    c.pulls["big:1"].set()
    await c.worker.wait_started()
    assert c.states("slow") == [TaskState.RUNNING]


async def test_pull_progress_is_the_task_status_message_reported_only_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a task's image is pulled, its status is PREPARING with the pull's progress as
    message (`service ps` shows it); a report goes out per period at most and only when the
    text changed; the RUNNING report follows and outranks it."""
    from shoal.node import worker as worker_mod
    monkeypatch.setattr(worker_mod, "PROGRESS_PERIOD", 0.01)
    c = Cluster(tmp_path)
    progress = {"big:1": "pulling image: 1.0 of 4.0 MiB (0/2 layers)"}
    c.worker.pull_progress = progress.get
    reports: list[str] = []
    report = c.worker._report

    async def counted(task: Any, status: TaskStatus) -> None:
        reports.append(status.message)
        await report(task, status)

    c.worker._report = counted  # type: ignore[method-assign]
    await c.boot()
    await c.services.create_service({"name": "slow", "image": "big:1",
                                     "command": ["sleep", "100"], "replicas": 1})
    await c.leader.one_pass()
    await c.worker.reconcile()

    def status() -> TaskStatus:
        (t,) = c.store.snapshot().tasks.values()
        return t.status

    for _ in range(500):
        if status().message == progress["big:1"]:
            break
        await asyncio.sleep(0.01)
    assert status().state is TaskState.PREPARING and status().message == progress["big:1"]
    await asyncio.sleep(0.1)  # ten periods, the same text: no new report
    assert reports == [progress["big:1"]]
    progress["big:1"] = "pulling image: 4.0 of 4.0 MiB (2/2 layers)"
    for _ in range(500):
        if status().message == progress["big:1"]:
            break
        await asyncio.sleep(0.01)
    assert reports == ["pulling image: 1.0 of 4.0 MiB (0/2 layers)", progress["big:1"]]
    c.pulls["big:1"].set()
    await c.worker.wait_started()
    assert status().state is TaskState.RUNNING


async def test_a_start_that_ends_during_a_pass_is_not_started_again(tmp_path: Path) -> None:
    """A start that finishes while a pass is under way (after the pass looked at the runtime,
    before it reaches that task) is not taken for a task the runtime has never seen: the task is
    not started a second time (the runtime would refuse: "already known") and stays RUNNING."""
    c = Cluster(tmp_path)
    await c.boot()
    await c.services.create_service({"name": "a", "command": ["sleep", "100"], "replicas": 1})
    await c.services.create_service({"name": "b", "image": "slow:1",
                                     "command": ["sleep", "100"], "replicas": 1})
    await c.leader.one_pass()
    await c.worker.reconcile()  # a starts; b waits for its image
    for _ in range(100):
        if c.states("a") == [TaskState.RUNNING]:
            break
        await asyncio.sleep(0.01)
    assert c.states("a") == [TaskState.RUNNING] and len(c.worker._starting) == 1
    (b_start,) = c.worker._starting.values()
    observe = c.worker._observe

    async def observe_while_b_finishes(task: Any, rt: Any) -> Any:
        if task.service_name == "a":  # the pass has read the runtime; now b's start ends
            c.pulls["slow:1"].set()
            await asyncio.wait({b_start})
        return await observe(task, rt)

    c.worker._observe = observe_while_b_finishes  # type: ignore[method-assign]
    await c.worker.reconcile()
    await c.worker.wait_started()
    assert c.states("b") == [TaskState.RUNNING]
    assert len(c.runtime.tasks()) == 2


async def test_service_commands_need_a_ready_manager(tmp_path: Path) -> None:
    """A worker refuses service commands; a duplicate name is a conflict, not a write."""
    c = Cluster(tmp_path)
    await c.boot()
    await c.services.create_service({"name": "web", "command": ["sleep", "1"]})
    index = c.store.index
    with pytest.raises(Conflict):
        await c.services.create_service({"name": "web", "command": ["sleep", "1"]})
    assert c.store.index == index
    assert c.ctx.identity is not None
    c.ctx.use(c.ctx.identity, c.store, None)  # as on a worker: no Raft replica
    with pytest.raises(NotManager):
        c.services.services()


def test_the_in_memory_store_is_a_state_source() -> None:
    store: StateSource = MemoryStore()
    assert store.is_ready() and store.is_leader() and store.index == 0


# ------------------------------------------------------------------------------------ step

def _task(state: TaskState, desired: TaskState = TaskState.RUNNING, pid: int | None = None,
          addr: str = "") -> Any:
    return task_from_dict({
        "id": "t1", "service_id": "s1", "service_name": "web", "slot": 1,
        "spec": {"name": "web", "command": ["sleep", "9"], "stop_grace_period": 4.0},
        "service_version": 1, "desired_state": int(desired), "node_id": "n1",
        "status": {"state": int(state), "pid": pid, "addr": addr}})


def _seen(state: TaskState, pid: int | None = None, addr: str = "") -> TaskStatus:
    return TaskStatus(state=state, timestamp=5.0, pid=pid, addr=addr)


S = TaskState
STEP_TABLE: list[tuple[str, Any, TaskStatus | None, bool, Action, TaskState | None]] = [
    # name, task, observed, busy → action, reported state
    ("assigned, nothing runs: start", _task(S.ASSIGNED), None, False, Action.START, None),
    ("preparing (waited before): start again", _task(S.PREPARING), None, False,
     Action.START, None),
    ("a start in flight: wait for it", _task(S.ASSIGNED), None, True, Action.NONE, None),
    ("ran here, runtime lost it: failed", _task(S.RUNNING), None, False, Action.NONE,
     S.FAILED),
    ("to stop, never started: shut down", _task(S.ASSIGNED, S.SHUTDOWN), None, False,
     Action.NONE, S.SHUTDOWN),
    ("ended and gone: nothing", _task(S.COMPLETE, S.SHUTDOWN), None, False, Action.NONE,
     None),
    ("running, should stop: stop", _task(S.RUNNING, S.SHUTDOWN, pid=7),
     _seen(S.RUNNING, 7), False, Action.STOP, None),
    ("running as reported: nothing", _task(S.RUNNING, pid=7, addr="10.1.0.2"),
     _seen(S.RUNNING, 7, "10.1.0.2"), False, Action.NONE, None),
    ("running, new address: report", _task(S.RUNNING, pid=7),
     _seen(S.RUNNING, 7, "10.1.0.2"), False, Action.NONE, S.RUNNING),
    ("started (adopted): report running", _task(S.ASSIGNED), _seen(S.RUNNING, 7), False,
     Action.NONE, S.RUNNING),
    ("exited non-zero: report failed", _task(S.RUNNING, pid=7), _seen(S.FAILED), False,
     Action.NONE, S.FAILED),
    ("ended, reported, not to run again: release (the record stays)",
     _task(S.FAILED, S.SHUTDOWN), _seen(S.FAILED), False, Action.RELEASE, None),
    ("stopped, first report and remove", _task(S.RUNNING, S.REMOVE), _seen(S.SHUTDOWN),
     False, Action.NONE, S.SHUTDOWN),
    ("ended, reported, still desired running: keep for the leader",
     _task(S.COMPLETE), _seen(S.COMPLETE), False, Action.NONE, None),
]


@pytest.mark.parametrize(("task", "seen", "busy", "action", "reported"),
                         [row[1:] for row in STEP_TABLE], ids=[row[0] for row in STEP_TABLE])
def test_next_step_table(task: Any, seen: TaskStatus | None, busy: bool, action: Action,
                         reported: TaskState | None) -> None:
    step = next_step(task, seen, busy=busy, now=9.0)
    assert step.action is action
    assert (step.report.state if step.report else None) == reported
    if action is Action.STOP:
        assert step.grace == 4.0


def test_next_step_never_reports_backwards() -> None:
    """Over every (status, desired, observed) combination the step's report is never older
    than the task's status: observations only move a task forward."""
    states = list(TaskState)
    for current, desired, observed in itertools.product(states, states, [None, *states]):
        task = _task(current, desired, pid=1)
        seen = None if observed is None else _seen(observed, 1)
        step = next_step(task, seen, now=9.0)
        if step.report is not None:
            assert step.report.state >= current, (current, desired, observed)


def test_a_backwards_report_is_a_bug() -> None:
    with pytest.raises(BackwardsTransition):
        _forward(_task(S.FAILED), Step(report=_seen(S.RUNNING)))


# ------------------------------------------------------------------------------------ quorum

VOTERS3 = ["a:1", "b:1", "c:1"]
VOTERS5 = ["a:1", "b:1", "c:1", "d:1", "e:1"]


@pytest.mark.parametrize(("voters", "removed", "reachable", "ok", "need"), [
    (VOTERS3, "c:1", {"a:1", "b:1"}, True, 2),  # both others up
    (VOTERS3, "c:1", {"a:1"}, False, 2),  # one other down: 1 of 2
    (VOTERS3, "a:1", {"a:1", "b:1", "c:1"}, True, 2),  # the removed one does not count
    (VOTERS5, "e:1", {"a:1", "b:1", "c:1"}, True, 3),  # 3 of 4
    (VOTERS5, "e:1", {"a:1", "b:1"}, False, 3),  # 2 of 4
    (["a:1", "b:1"], "b:1", {"a:1"}, True, 1),  # two managers down to one
    (VOTERS3, "w:1", {"a:1", "b:1"}, True, 2),  # not a voter: all three stay, 2 of 3
], ids=["3-all-up", "3-one-down", "removed-not-counted", "5-three-up", "5-two-up", "2-to-1",
        "non-voter"])
def test_quorum_after_removal(voters: list[str], removed: str, reachable: set[str], ok: bool,
                              need: int) -> None:
    q = quorum_after_removal(voters, removed, reachable)
    assert (q.ok, q.need) == (ok, need)


@pytest.mark.parametrize(("managers", "warns"), [(0, False), (1, False), (2, True),
                                                 (3, False), (4, True), (5, False)])
def test_even_manager_counts_warn(managers: int, warns: bool) -> None:
    assert bool(even_managers_warning(managers)) is warns


# ------------------------------------------------------------------------------------ dispatcher

async def test_a_workers_feed_follows_the_dispatcher_and_reports_only_its_own_tasks(
        tmp_path: Path) -> None:
    """A worker's StateFeed, served in-process by a manager's dispatcher (the code behind
    /v1/cluster/state and /v1/cluster/report), catches up with the manager's state; the
    worker may report its own tasks' status but not another node's."""
    c = Cluster(tmp_path)
    await c.boot()
    await c.ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="w1", hostname="w1", addr="10.0.0.2", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER))})
    dispatcher = Dispatcher(c.ctx, Security(c.ctx), lambda: None)
    c.store.add_listener(lambda _i: dispatcher.applied())
    peer = CertInfo("w1", "worker", "c1", 1, 0.0, 4e9)

    async def call_bytes(addr: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        return await dispatcher.state_since(peer, body["after"], body["wait"])

    async def call_json(addr: str, path: str, body: dict[str, Any], timeout: float
                        ) -> dict[str, Any]:
        return await dispatcher.worker_report(peer, body["cmd"])

    feed = StateFeed("w1", ["10.0.0.1:2377"], call_bytes, call_json,
                     FeedConfig(wait=0.2, retry=0.01, write_timeout=1.0))
    run = asyncio.create_task(feed.run())
    try:
        await c.services.create_service({"name": "web", "command": ["sleep", "9"],
                                         "replicas": 2})
        await c.leader.one_pass()
        for _ in range(200):
            if feed.is_ready() and feed.index == c.store.index:
                break
            await asyncio.sleep(0.01)
        assert feed.index == c.store.index
        assert feed.snapshot().tasks.keys() == c.store.snapshot().tasks.keys()
        tid = next(iter(c.store.snapshot().tasks))  # on n1, the manager
        with pytest.raises(Forbidden, match="only report its own"):
            await dispatcher.worker_report(peer, {
                "op": "task_status", "task_id": tid, "node_id": "n1", "now": 2.0,
                "status": {"state": int(TaskState.RUNNING)}})
        # its own removal goes through
        await feed.propose({"op": "node_remove", "id": "w1", "now": 3.0, "force": True})
        assert "w1" not in c.store.snapshot().nodes
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run


async def test_live_usage_skips_a_node_that_did_not_answer_for_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`service ps` asks each node for its tasks' usage; a node that does not answer (cut
    off, not yet judged by gossip) made every listing wait the full timeout — 1 s per
    `service ps`, which also skewed the gossip bench's cut-link figure. Now it is not asked
    again for USAGE_QUIET seconds, and answers again once it does."""
    from shoal.node import transfer as transfer_mod

    c = Cluster(tmp_path)
    await c.boot()
    await c.ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="n2", hostname="h2", addr="10.0.0.2", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER, memory_bytes=1 << 33, cpus=4.0))})
    asked: list[str] = []
    answer = False

    class Reply:
        async def json(self) -> dict[str, Any]:
            return {"t2": {"memory_bytes": 7}}

        def release(self) -> None:
            pass

    async def request(node: Node, method: str, path: str, body: Any = None,
                      timeout: float = 30.0) -> Reply:
        asked.append(node.id)
        if not answer:
            await asyncio.sleep(30)  # cut off: no answer
        return Reply()
    monkeypatch.setattr(c.transfer, "_request", request)

    by_node = {"n2": ["t2"]}
    assert await transfer_mod.cluster_usage(c.transfer, by_node, 0.05, listing=True) == {}
    assert await transfer_mod.cluster_usage(c.transfer, by_node, 0.05, listing=True) == {}
    assert asked == ["n2"], "the second listing waited for the silent node again"
    assert await transfer_mod.cluster_usage(c.transfer, by_node, 0.05) == {}
    assert asked == ["n2", "n2"], "the autoscaler (not a listing) asks every node each time"
    c.transfer.usage_quiet["n2"] = 0.0  # USAGE_QUIET later
    answer = True
    assert await transfer_mod.cluster_usage(c.transfer, by_node, 0.05, listing=True) == \
        {"t2": {"memory_bytes": 7}}
    assert asked == ["n2", "n2", "n2"] and "n2" not in c.transfer.usage_quiet


async def test_a_nodes_own_usage_is_read_off_its_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a task's usage is a few cgroup files (~70 µs each task on this machine):
    `shoal stats` asks every node every second, and a node of 4,000 tasks held its event loop
    ~0.3 s each time (heartbeats, the feed, every API call waiting) — past the listing's 0.3 s
    timeout, so it never answered either. The reads run in a worker thread."""
    import threading

    from shoal.node import transfer as transfer_mod

    c = Cluster(tmp_path)
    await c.boot()
    read_on: list[int] = []
    real = c.transfer.runtime.usage

    def usage(tid: str) -> Any:
        read_on.append(threading.get_ident())
        return real(tid)
    monkeypatch.setattr(c.transfer.runtime, "usage", usage)
    await transfer_mod.cluster_usage(c.transfer, {"n1": ["t1", "t2"]}, 0.3, listing=True)
    assert len(read_on) == 2 and threading.get_ident() not in read_on


def test_a_tasks_default_host_name_is_a_valid_label_that_keeps_its_slot() -> None:
    """A long service name is cut, never the slot or node part, and no cut ends in '-': a
    62-character service name's tasks never started ("not a valid host name: 'aaa…a-'"),
    and a 61-character one's slots 1 and 10 had the same host name."""
    assert default_hostname("web.3") == "web-3"
    assert default_hostname("my_app.v2.12") == "my-app-v2-12"
    assert default_hostname("agent.1f2e3d4c5b6a") == "agent-1f2e3d4c5b6a"
    long62 = default_hostname("a" * 62 + ".1")
    assert len(long62) == 63 and long62.endswith("a-1")
    assert default_hostname("a" * 61 + ".1") != default_hostname("a" * 61 + ".10")
    assert default_hostname("ab" + "-" * 58 + "x.12") == "ab-12"
    assert all(len(default_hostname(f"{'s' * n}.{slot}")) <= 63
               for n in range(1, 70) for slot in (1, 10, 999))
