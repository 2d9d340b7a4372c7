"""A worker's status reports gathered into one write (node/reports.py ``Reporter``, the
state machine's ``task_statuses``, raft/state.py), through the real worker channel: the
worker's StateFeed proposes, the real dispatcher checks and proposes on a MemoryStore (as
tests/test_feed_scale.py). Also the batch's place in the feed's deferral
(``deferrable_owner``), the event derivation and the clock correction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from feedrig import feed_worker
from helpers import proposals
from test_feed_scale import _manager, _until

from shoal.node.control.dispatcher import CLOCK_SAMPLE_RTT, in_manager_time
from shoal.node.errors import Forbidden
from shoal.node.events import _touched_tasks
from shoal.node.feed import FeedConfig, deferrable_owner
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.pki import CertInfo
from shoal.node.reports import Reporter
from shoal.node.source import MemoryStore
from shoal.raft.models import Task, TaskState, TaskStatus, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState


def _status(state: TaskState, **kw: Any) -> TaskStatus:
    return TaskStatus(state=state, timestamp=time.time(), message=state.lower(), **kw)


async def _on_w0(tmp_path: Path, replicas: int) -> tuple[MemoryStore, Any, list[Task]]:
    """A manager (n1) and 20 workers; a service of ``replicas`` tasks all placed on w0."""
    store = MemoryStore()
    dispatcher = await _manager(tmp_path, store, FeedConfig())
    await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
        "name": "web", "mode": {"replicas": replicas}, "task": {
            "container": {"command": ["sleep", "9"]},
            "placement": {"constraints": ["node.hostname==w0"]}}}})
    await LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event()).one_pass(led_for=0.0)
    tasks = sorted(store.snapshot().tasks.values(), key=lambda t: t.id)
    assert len(tasks) == replicas and {t.node_id for t in tasks} == {"w0"}
    return store, dispatcher, tasks


async def test_reports_made_together_go_in_one_write_and_all_apply(tmp_path: Path) -> None:
    """30 tasks report STARTING at once: one ``task_statuses``. Then one reports RUNNING
    and, while that write is in flight, the other 29: they go together in the next write.
    Every status is in the managers' state, and the worker's replica equals it."""
    store, dispatcher, tasks = await _on_w0(tmp_path, 30)
    feed = feed_worker(dispatcher, "w0", FeedConfig(wait=5.0, retry=0.01))
    run = asyncio.create_task(feed.run())
    try:
        await _until(lambda: feed.is_ready() and feed.index == store.index)
        reporter = Reporter("w0", lambda: feed)
        before = store.index
        await asyncio.gather(*(reporter.report(t.id, _status(TaskState.STARTING))
                               for t in tasks))
        assert reporter.writes == 1 and store.index - before == 1
        assert all(store.snapshot().tasks[t.id].status.state is TaskState.STARTING
                   for t in tasks)
        first = asyncio.create_task(reporter.report(tasks[0].id, _status(
            TaskState.RUNNING, addr="10.1.0.1")))
        await _until(lambda: reporter.writes == 2)  # in flight
        await asyncio.gather(first, *(reporter.report(t.id, _status(
            TaskState.RUNNING, addr=f"10.1.1.{i}")) for i, t in enumerate(tasks[1:])))
        assert reporter.writes == 3 and store.index - before == 3
        assert all(store.snapshot().tasks[t.id].status.state is TaskState.RUNNING
                   for t in tasks)
        await _until(lambda: feed.index == store.index)
        assert feed.snapshot().tasks == store.snapshot().tasks
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run


async def test_while_older_nodes_remain_each_report_is_its_own_task_status(
        tmp_path: Path) -> None:
    """Cluster schema below 3 (an older node may apply the log): one write per report."""
    store = MemoryStore()  # never initialised with a schema: LEGACY
    await store.propose({"op": "node_add", "now": 1.0, "node": {
        "id": "w0", "hostname": "w0", "addr": "10.0.1.0", "api_port": 2377,
        "raft_port": 2378, "role": "worker"}})
    await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 5}})
    await LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event()).one_pass(led_for=0.0)
    tasks = list(store.snapshot().tasks.values())
    ops: list[str] = []
    propose = store.propose

    async def spy(cmd: dict[str, Any]) -> dict[str, Any]:
        ops.append(cmd["op"])
        return await propose(cmd)

    store.propose = spy  # type: ignore[method-assign]
    reporter = Reporter("w0", lambda: store)
    await asyncio.gather(*(reporter.report(t.id, _status(TaskState.RUNNING)) for t in tasks))
    assert ops == ["task_status"] * 5
    assert all(t.status.state is TaskState.RUNNING for t in store.snapshot().tasks.values())


async def test_two_reports_of_one_task_in_a_batch_keep_the_greater(tmp_path: Path) -> None:
    store, _dispatcher, tasks = await _on_w0(tmp_path, 3)
    reporter = Reporter("w0", lambda: store)
    t0, t1 = tasks[0].id, tasks[1].id
    await asyncio.gather(reporter.report(t0, _status(TaskState.PREPARING)),
                         reporter.report(t1, _status(TaskState.RUNNING)),
                         reporter.report(t1, _status(TaskState.STARTING)))  # older: dropped
    assert store.snapshot().tasks[t1].status.state is TaskState.RUNNING
    assert reporter.writes == 1


def test_the_state_machine_applies_each_report_and_names_the_refused_ones() -> None:
    st = ClusterState()
    batch = {"op": "task_statuses", "node_id": "w0", "now": 2.0, "reports": []}
    assert st.apply(batch)["error"]["field"] == "op"  # schema < 3: unknown, as older nodes
    st.apply({"op": "cluster_init", "cluster_id": "c1", "now": 1.0, "worker_secret": "",
              "manager_secret": "", "digest": "", "schema": SCHEMA})
    assert st.apply(batch)["ok"]
    st.apply({"op": "node_add", "now": 1.0, "node": {
        "id": "w0", "hostname": "w0", "addr": "10.0.1.0", "api_port": 2377,
        "raft_port": 2378, "role": "worker"}})
    st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 2}})
    asyncio.run(LeaderLoop(_Wrap(st), {}, OrchestratorConfig(), asyncio.Event())
                .one_pass(led_for=0.0))
    ids = sorted(st.tasks)
    running = to_dict(_status(TaskState.RUNNING))
    res = st.apply({"op": "task_statuses", "node_id": "w0", "now": 2.0, "reports": [
        [ids[0], running], ["nope", running], [ids[1], {"state": "bogus"}]]})
    assert res["ok"] and res["changed"] == 1
    assert set(res["refused"]) == {"nope", ids[1]} and "no such task" in res["refused"]["nope"]
    assert st.tasks[ids[0]].status.state is TaskState.RUNNING
    assert st.tasks[ids[1]].status.state is not TaskState.RUNNING
    # another node's tasks are refused one by one too
    res = st.apply({"op": "task_statuses", "node_id": "w9", "now": 2.0,
                    "reports": [[ids[1], running]]})
    assert res["changed"] == 0 and "not assigned to node w9" in res["refused"][ids[1]]
    for bad, field in (({"reports": "x"}, "reports"), ({"reports": [["t", 1]]}, "reports"),
                       ({"node_id": 7}, "node_id"), ({"now": "soon"}, "now")):
        cmd = {"op": "task_statuses", "node_id": "w0", "now": 2.0, "reports": [], **bad}
        assert st.apply(cmd)["error"]["field"] == field


class _Wrap(MemoryStore):
    """A MemoryStore around an existing ClusterState (for one leader pass)."""

    def __init__(self, st: ClusterState) -> None:
        super().__init__()
        self.state = st


async def test_the_worker_channel_refuses_a_batch_for_another_node(tmp_path: Path) -> None:
    store, dispatcher, tasks = await _on_w0(tmp_path, 2)
    peer = CertInfo("w1", "worker", "c1", 1, 0.0, 4e9)
    with pytest.raises(Forbidden, match="only report its own"):
        await dispatcher.worker_report(peer, {
            "op": "task_statuses", "node_id": "w0", "now": time.time(),
            "reports": [[tasks[0].id, to_dict(_status(TaskState.FAILED))]]})
    assert store.snapshot().tasks[tasks[0].id].status.state is not TaskState.FAILED


def _blob(cmd: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(cmd, use_bin_type=True))


def _batch(*states: TaskState) -> dict[str, Any]:
    return {"op": "task_statuses", "node_id": "w0", "now": 1.0,
            "reports": [[f"t{i}", to_dict(_status(s, addr="10.1.0.2"))]
                        for i, s in enumerate(states)]}


def test_a_batch_is_deferrable_only_if_every_report_in_it_is() -> None:
    assert deferrable_owner(_blob(_batch(TaskState.PREPARING, TaskState.STARTING))) == "w0"
    assert deferrable_owner(_blob(_batch(TaskState.STARTING, TaskState.RUNNING))) is None
    assert deferrable_owner(_blob({"op": "task_statuses", "node_id": "w0",
                                   "reports": [["t1"]]})) is None
    assert deferrable_owner(_blob({"op": "task_statuses", "node_id": "w0",
                                   "reports": []})) is None
    seen: dict[str, Any] = {}
    assert deferrable_owner(_blob(_batch(TaskState.RUNNING, TaskState.RUNNING)), seen) is None
    assert deferrable_owner(_blob(_batch(TaskState.RUNNING, TaskState.RUNNING)), seen) == "w0"


def test_events_and_the_clock_correction_read_every_report_of_a_batch() -> None:
    cmd = _batch(TaskState.RUNNING, TaskState.FAILED)
    assert _touched_tasks(cmd) == {"t0", "t1"}
    assert _touched_tasks({"op": "task_statuses", "reports": "x"}) == set()
    moved, offset = in_manager_time({**cmd, "now": 1000.0}, 1600.0)
    assert offset == 600.0 and moved["now"] == 1600.0
    for (_, before), (_, after) in zip(cmd["reports"], moved["reports"], strict=True):
        assert after["timestamp"] == pytest.approx(before["timestamp"] + 600.0)


async def test_a_report_late_at_a_busy_manager_is_not_taken_for_clock_skew(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A report that reaches the manager 6 s after it was sent (a busy manager, the scale
    lab) has its times moved by 6 s when the worker's clock offset is unknown — the one-way
    estimate cannot tell transit from skew — and is left as it is when the worker sends the
    offset its heartbeats measured ("skew", dropped before the Raft log); a real offset
    measured that way is corrected."""
    store, dispatcher, tasks = await _on_w0(tmp_path, 3)
    peer = CertInfo("w0", "worker", "c1", 1, 0.0, 4e9)

    async def report(task: Task, **extra: Any) -> float:
        sent = time.time() - 6.0
        status = _status(TaskState.RUNNING)
        await dispatcher.worker_report(peer, {
            "op": "task_statuses", "node_id": "w0", "now": sent, **extra,
            "reports": [[task.id, {**to_dict(status), "timestamp": sent}]]})
        assert "skew" not in store.command_at(store.index)
        return store.snapshot().tasks[task.id].status.timestamp - sent

    with caplog.at_level(logging.WARNING, "shoal.dispatcher"):
        assert await report(tasks[0]) == pytest.approx(6.0, abs=0.5)  # one-way: "corrected"
        assert "off by -6" in caplog.text
        assert await report(tasks[1], skew=0.02) == 0.0  # measured: the clocks agree
        assert await report(tasks[2], skew=600.0) == 600.0  # measured: 10 minutes behind


async def test_a_worker_sends_the_offset_its_heartbeats_measured(tmp_path: Path) -> None:
    """The heartbeat answer carries the manager's ``now``; a round trip of at most
    CLOCK_SAMPLE_RTT measures the offset (the middle of the trip against it), a longer one
    or an answer without ``now`` (an older manager) measures nothing; the reporter sends
    the measured offset as "skew"."""
    store, dispatcher, tasks = await _on_w0(tmp_path, 1)
    reply = dispatcher.heartbeat(CertInfo("w0", "worker", "c1", 1, 0.0, 4e9), "w0")
    assert abs(reply["now"] - time.time()) < 1.0
    assert dispatcher.measured_offset() is None
    dispatcher._sample_clock(100.0, 700.2, 100.4)  # manager 10 minutes ahead, 0.4 s trip
    assert dispatcher.measured_offset() == pytest.approx(600.0)
    dispatcher._sample_clock(100.0, 900.0, 100.0 + CLOCK_SAMPLE_RTT + 0.1)  # too slow
    dispatcher._sample_clock(100.0, None, 100.1)  # an older manager
    assert dispatcher.measured_offset() == pytest.approx(600.0)

    # through _beat: only the leader's answer is a sample (its clock judges the times; a
    # follower's may be as far off as this node's: tests/test_faults_clock.py)
    async def answer(leader: bool, ahead: float) -> None:
        async def call(addr: str, path: str, body: Any, timeout: float) -> dict[str, Any]:
            return {"ok": True, "leader": leader, "now": time.time() + ahead}
        dispatcher.security.call = call  # type: ignore[method-assign,assignment]
        await dispatcher._beat("10.0.0.2:2377", "h2", "w0")
    await answer(leader=False, ahead=-300.0)
    assert dispatcher.measured_offset() == pytest.approx(600.0)
    await answer(leader=True, ahead=42.0)
    assert dispatcher.measured_offset() == pytest.approx(42.0, abs=0.25)

    sent = proposals(store)
    await Reporter("w0", lambda: store, dispatcher.measured_offset).report(
        tasks[0].id, _status(TaskState.RUNNING))
    await Reporter("w0", lambda: store).report(tasks[0].id, _status(TaskState.RUNNING))
    assert [c.get("skew") for c in sent] == [pytest.approx(42.0, abs=0.25), None]
