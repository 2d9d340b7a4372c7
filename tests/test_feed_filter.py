"""Per-node filtering of the workers' state feed (node/feed.py ``FeedServer.wakes``,
``deferrable_owner``; the real dispatcher's held polls, node/control/dispatcher.py): a commit
only another node needs at once — that node's task reporting a state below RUNNING — does
not answer a worker's held poll; it goes out with the next commit the worker needs (or after
``defer_max``), unchanged and in order, so the replica is exactly the managers' at its
index. In one process on a MemoryStore, like tests/test_feed_scale.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from feedrig import ADDR, feed_worker
from test_feed_scale import _manager, _until

from shoal.node.control.dispatcher import Dispatcher
from shoal.node.feed import FeedConfig, Need, StateFeed, classify, deferrable_owner
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore
from shoal.raft.models import Task, TaskState, TaskStatus, to_dict


def _follow(dispatcher: Dispatcher, node: str) -> StateFeed:
    # polls held up to 60 s: nothing but a commit (or defer_max) answers them in this test
    return feed_worker(dispatcher, node, FeedConfig(wait=60.0, retry=0.01))


def _report(task: Task | tuple[str, str], state: TaskState, addr: str = ""
            ) -> dict[str, Any]:
    task_id, node_id = task if isinstance(task, tuple) else (task.id, task.node_id)
    return {"op": "task_status", "task_id": task_id, "node_id": node_id,
            "now": time.time(), "status": to_dict(TaskStatus(
                state=state, timestamp=time.time(), message=state.lower(), addr=addr))}


def _health(task: tuple[str, str], health: str, streak: int, addr: str = "10.1.0.2"
            ) -> bytes:
    cmd = _report(task, TaskState.RUNNING, addr)
    cmd["status"].update(health=health, failing_streak=streak,
                         health_log=[{"start": 1.0, "end": 1.1, "exit_code": streak,
                                      "output": "probe output " * 20}])
    return _blob(cmd)


def test_a_health_log_refresh_is_deferrable_a_health_change_is_not() -> None:
    """With the views seen: a RUNNING report is deferrable only if it leaves the task's
    (state, health, address) as the previous report had it."""
    t, seen = ("t1", "w0"), {}
    assert deferrable_owner(_health(t, "healthy", 0), seen) is None  # first seen: needed
    assert deferrable_owner(_health(t, "healthy", 0), seen) == "w0"  # log refresh
    assert deferrable_owner(_health(t, "healthy", 1), seen) == "w0"  # streak counting up
    assert deferrable_owner(_health(t, "unhealthy", 3), seen) is None  # leaves the LB
    assert deferrable_owner(_health(t, "unhealthy", 4), seen) == "w0"
    assert deferrable_owner(_health(t, "unhealthy", 4, addr="10.1.0.9"), seen) is None
    assert deferrable_owner(_blob(_report(t, TaskState.FAILED)), seen) is None
    assert "t1" not in seen  # forgotten once terminal
    assert deferrable_owner(_health(t, "healthy", 0)) is None  # without views: needed


def _blob(cmd: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(cmd, use_bin_type=True))


def test_only_another_nodes_task_below_running_is_deferrable() -> None:
    t = ("t1", "w0")
    assert deferrable_owner(_blob(_report(t, TaskState.PREPARING))) == "w0"
    assert deferrable_owner(_blob(_report(t, TaskState.STARTING))) == "w0"
    for state in (TaskState.RUNNING, TaskState.FAILED, TaskState.COMPLETE):
        assert deferrable_owner(_blob(_report(t, state))) is None
    assert deferrable_owner(_blob({"op": "node_update", "id": "w0", "labels": {
        "x": "task_status"}})) is None
    assert deferrable_owner(b"\xc1task_status garbage") is None
    assert deferrable_owner(_blob({"op": "task_status", "node_id": "w0",
                                   "status": {"state": True}})) is None


def test_a_tasks_new_running_view_is_needed_soon_one_leaving_the_mesh_now() -> None:
    """``classify``: the report's node needs it at once; the other nodes need a RUNNING
    task's new view soon (their mesh and DNS add it), a task leaving the mesh (unhealthy,
    ended) now, and a view they already have later."""
    t, seen = ("t1", "w0"), {}
    assert classify(_blob(_report(t, TaskState.STARTING)), seen) == ("w0", Need.LATER)
    assert classify(_health(t, "starting", 0), seen) == ("w0", Need.SOON)  # started
    assert classify(_health(t, "healthy", 0), seen) == ("w0", Need.SOON)  # healthy now
    assert classify(_health(t, "healthy", 0), seen) == ("w0", Need.LATER)  # log refresh
    assert classify(_health(t, "unhealthy", 3), seen) == (None, Need.NOW)  # leaves the LB
    assert classify(_blob(_report(t, TaskState.FAILED)), seen) == (None, Need.NOW)
    # a batch is needed as soon as its most needed report
    u, v = ("t2", "w0"), ("t3", "w0")
    batch = {"op": "task_statuses", "node_id": "w0", "now": time.time(), "reports": [
        [u[0], _report(u, TaskState.STARTING)["status"]],
        [v[0], _report(v, TaskState.RUNNING, addr="10.1.0.3")["status"]]]}
    assert classify(_blob(batch), seen) == ("w0", Need.SOON)
    batch["reports"].append([t[0], _report(t, TaskState.COMPLETE)["status"]])
    assert classify(_blob(batch), seen) == (None, Need.NOW)
    assert classify(_health(t, "healthy", 0)) == (None, Need.NOW)  # without views: now


async def _cluster(tmp_path: Path, config: FeedConfig
                   ) -> tuple[MemoryStore, Dispatcher, list[Task]]:
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    dispatcher = await _manager(tmp_path, store, config)
    await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 20}})
    await LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event()).one_pass(led_for=0.0)
    tasks = sorted(store.snapshot().tasks.values(), key=lambda t: t.id)
    return store, dispatcher, tasks


async def test_a_worker_is_not_woken_for_another_nodes_task_starting(tmp_path: Path) -> None:
    """w_a's task reports PREPARING and STARTING: w_a gets them at once, w_b's poll stays
    held (it needs neither); the task's RUNNING report then reaches both, w_b receiving the
    three in order — both replicas equal the manager's state, field for field."""
    store, dispatcher, tasks = await _cluster(tmp_path, FeedConfig(defer_max=60.0))
    task = tasks[0]
    other = next(f"w{i}" for i in range(20) if f"w{i}" != task.node_id)
    feeds = [_follow(dispatcher, task.node_id), _follow(dispatcher, other)]
    runs = [asyncio.create_task(f.run()) for f in feeds]
    try:
        await _until(lambda: all(f.index == store.index for f in feeds))
        start = store.index
        await store.propose(_report(task, TaskState.PREPARING))
        await store.propose(_report(task, TaskState.STARTING))
        await _until(lambda: feeds[0].index == store.index)
        await _until(lambda: dispatcher.feed.stats.held >= 1)
        assert feeds[1].index == start  # held: its poll was not answered
        assert dispatcher.feed.stats.deferred >= 1
        await store.propose(_report(task, TaskState.RUNNING, addr="10.1.0.2"))
        await _until(lambda: all(f.index == store.index for f in feeds))
        for f in feeds:
            assert f.snapshot() == store.snapshot()
        assert feeds[1].snapshot().tasks[task.id].status.addr == "10.1.0.2"
        # the same view again (a refresh, a later timestamp): w_b not woken; then a commit
        # everyone needs brings it along
        seen = store.index
        await store.propose(_report(task, TaskState.RUNNING, addr="10.1.0.2"))
        await _until(lambda: feeds[0].index == store.index)
        await _until(lambda: dispatcher.feed.stats.held >= 1)
        assert feeds[1].index == seen
        await store.propose({"op": "node_update", "id": other, "now": 5.0, "labels": {"a": "b"}})
        await _until(lambda: all(f.index == store.index for f in feeds))
        for f in feeds:
            assert f.snapshot() == store.snapshot()
        assert feeds[1].resyncs == 0
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


@pytest.mark.parametrize("defer", [0.3, 0.0])
async def test_deferred_commits_go_out_after_defer_max_without_another_commit(
        tmp_path: Path, defer: float) -> None:
    """Nothing else happens after another node's task started: the worker still gets the
    report once ``defer_max`` passed (its replica does not lag for ever); with filtering
    off (``defer_max`` 0) it gets it at once."""
    store, dispatcher, tasks = await _cluster(tmp_path, FeedConfig(defer_max=defer))
    task = tasks[0]
    other = next(f"w{i}" for i in range(20) if f"w{i}" != task.node_id)
    feed = _follow(dispatcher, other)
    run = asyncio.create_task(feed.run())
    try:
        await _until(lambda: feed.index == store.index)
        await store.propose(_report(task, TaskState.PREPARING))
        await _until(lambda: feed.index == store.index, timeout=30.0)
        assert feed.snapshot() == store.snapshot()
        assert (dispatcher.feed.stats.deferred > 0) == (defer > 0)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


@pytest.mark.parametrize("soon", [0.5, 0.0])
async def test_other_nodes_tasks_starting_reach_a_worker_together(
        tmp_path: Path, soon: float) -> None:
    """Ten tasks of other nodes report RUNNING, each in its own commit: a worker's held poll
    is answered once ``soon_wait`` after the first (not once per report), with all of them,
    in order, and its replica equals the manager's; each report's own node gets it at
    once. With ``soon_wait`` 0 every report answers it at once."""
    store, dispatcher, tasks = await _cluster(tmp_path, FeedConfig(soon_wait=soon))
    watcher = "w19"
    starting = [t for t in tasks if t.node_id != watcher][:10]
    feed = _follow(dispatcher, watcher)
    owner = _follow(dispatcher, starting[0].node_id)
    batches: list[int] = []
    feed.add_listener(batches.append)
    runs = [asyncio.create_task(f.run()) for f in (feed, owner)]
    try:
        await _until(lambda: feed.index == owner.index == store.index)
        batches.clear()
        deferred = dispatcher.feed.stats.deferred
        await store.propose(_report(starting[0], TaskState.RUNNING, addr="10.1.0.2"))
        await _until(lambda: owner.index == store.index)
        for i, task in enumerate(starting[1:], 3):
            await store.propose(_report(task, TaskState.RUNNING, addr=f"10.1.0.{i}"))
        await _until(lambda: feed.index == store.index, timeout=30.0)
        assert feed.snapshot() == store.snapshot()
        if soon:
            assert dispatcher.feed.stats.deferred > deferred
            assert len(batches) <= 2, batches  # (2: a slow machine may split the burst)
        else:
            assert dispatcher.feed.stats.deferred == deferred
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
