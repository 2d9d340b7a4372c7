"""The rolling-update policy (issue 12): order, failure action, monitor, max failure ratio —
table tests of the pure functions, and whole rollouts played on a ClusterState with a fake
agent on a virtual clock (one step = one second: the leader's pass, placement, then every
task advances one state: started → running/starting → healthy, or unhealthy → failed for
the "bad" version; a task told to stop stops). Also the state machine's update-status parts
and the update flags' parsing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import msgspec
import pytest
from test_spec import _subparser

from shoal.cli import specflags
from shoal.cli.errors import CliError
from shoal.node.orchestrator import OrchestratorConfig, reconcile_services
from shoal.node.rollout import (
    failure_response,
    plan_rollout,
    rollout_failed,
    too_many_failures,
)
from shoal.raft.errors import ValidationError
from shoal.raft.models import Health, Task, TaskState, TaskStatus, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.spec import RollbackConfig, UpdateConfig
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.raft.wire import state_from_plain, state_to_bytes

import msgpack  # isort: skip

CHECKED = {"command": ["srv"], "env": {"V": "1"}, "healthcheck": {"tcp": 80}}


def spec(replicas: int = 4, version: str = "1", **update: Any) -> dict[str, Any]:
    return {"name": "web", "mode": {"replicas": replicas},
            "task": {"container": {**CHECKED, "env": {"V": version}},
                     "restart": {"delay": 0.0}},
            "update": {"monitor": 0.0, **update}}


def global_spec(version: str = "1", memory: int = 0, **update: Any) -> dict[str, Any]:
    s = {**spec(0, version, **update), "mode": {"type": "global"}}
    s["task"]["resources"] = {"reservations": {"memory": memory}}
    return s


class Sim:
    """One node, the leader's loops and a fake agent, on a virtual clock."""

    def __init__(self, first: dict[str, Any], nodes: int = 1, memory: int = 0) -> None:
        self.st = ClusterState()
        self.st.cluster = replace(self.st.cluster, schema=SCHEMA)  # (every node on today's)
        self.now = 1.0
        for i in range(1, nodes + 1):  # (``memory``: each node's, bytes; 0 = unknown)
            self.st.apply({"op": "node_add", "now": 1.0, "node": {
                "id": f"n{i}", "hostname": f"h{i}", "addr": f"10.0.0.{i}", "api_port": 2377,
                "raft_port": 2378, "role": "manager" if i == 1 else "worker",
                "state": "ready", "memory_bytes": memory, "cpus": 2.0}})
        self.max_per_node = 0  # the most tasks running on one node at once
        assert "ok" in self.st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                                      "spec": first})
        self.ids: Iterator[str] = iter(f"t{i:04d}" for i in range(100_000))
        self.max_running = 0
        self.min_up = 10**6
        self.stop_steps = 0  # how many steps a task takes to stop once told (its grace)
        self.told: dict[str, float] = {}
        self.max_per_slot = 0  # the most tasks running in one slot at once
        self.run(6)

    @property
    def svc(self) -> Any:
        return self.st.services["s1"]

    def update(self, new: dict[str, Any], rollback: bool = False) -> None:
        self.max_per_node = 0
        self.now += 1.0
        res = self.st.apply({"op": "service_update", "id": "s1", "now": self.now, "spec": new,
                             **({"rollback": True} if rollback else {})})
        assert "error" not in res, res
        self.max_running, self.min_up = 0, 10**6

    def step(self) -> None:
        self.now += 1.0
        now = self.now
        ops, _ = reconcile_services(self.st.snapshot(), now, lambda: next(self.ids),
                                    OrchestratorConfig())
        if ops:
            assert "error" not in self.st.apply({"op": "leader", "term": 1, "now": now,
                                                 "ops": ops})
        for t in list(self.st.tasks.values()):
            if not t.node_id and t.alive:
                self.st.apply({"op": "leader", "term": 1, "now": now,
                               "ops": [("assign", t.id, "n1")]})
        for t in list(self.st.tasks.values()):
            s = t.status
            if not t.node_id or s.state.terminal:
                continue
            if t.desired_state >= TaskState.SHUTDOWN:
                if now - self.told.setdefault(t.id, now) < self.stop_steps:
                    continue  # (still stopping: its stop grace period)
                new = TaskStatus(state=TaskState.SHUTDOWN, timestamp=now)
            elif s.state < TaskState.RUNNING:
                new = TaskStatus(state=TaskState.RUNNING, timestamp=now,
                                 health=Health.STARTING)
            elif s.health is Health.STARTING:
                bad = t.spec.container.env["V"].startswith("bad")
                new = replace(s, health=Health.UNHEALTHY if bad else Health.HEALTHY)
            elif s.health is Health.UNHEALTHY:
                new = replace(s, state=TaskState.FAILED, timestamp=now, err="unhealthy")
            else:
                continue
            self.st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                           "now": now, "status": to_dict(new)})
        running = [t for t in self.st.tasks.values() if t.status.state is TaskState.RUNNING]
        self.max_running = max(self.max_running, len(running))
        self.max_per_node = max([self.max_per_node, *Counter(
            t.node_id for t in running).values()])
        self.min_up = min(self.min_up, sum(t.status.up for t in running))
        if not self.svc.spec.mode.per_node:
            self.max_per_slot = max([self.max_per_slot, *Counter(
                t.slot for t in running).values()])

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def until(self, state: str, limit: int = 60) -> int:
        for i in range(limit):
            if self.svc.update_status.state == state:
                return i
            self.step()
        raise AssertionError(f"not {state} after {limit} steps: {self.svc.update_status}")

    def live(self) -> list[Task]:
        return sorted((t for t in self.st.tasks.values() if t.alive), key=lambda t: t.slot)

    def versions(self) -> list[str]:
        return [t.spec.container.env["V"] for t in self.live()]


# ------------------------------------------------------------------ order

def test_start_first_runs_old_and_new_side_by_side_within_the_parallelism() -> None:
    """start-first never has fewer than `replicas` tasks up (each slot's old task serves
    until its replacement is healthy), and never more than replicas + parallelism running
    (docs/reliability.md's invariant)."""
    sim = Sim(spec(4))
    old = {t.id for t in sim.live()}
    sim.update(spec(4, "2", order="start-first", parallelism=2))
    sim.until("completed")
    assert sim.versions() == ["2"] * 4 and not old & {t.id for t in sim.live()}
    assert sim.min_up >= 4
    assert 4 < sim.max_running <= 4 + 2


def test_stop_first_stops_before_it_starts() -> None:
    sim = Sim(spec(4))
    sim.update(spec(4, "2", parallelism=2))
    sim.until("completed")
    assert sim.versions() == ["2"] * 4
    assert sim.max_running <= 4 and sim.min_up == 2  # two slots down at a time


def test_start_first_waits_for_health_before_stopping_the_old_task() -> None:
    sim = Sim(spec(2))
    sim.update(spec(2, "2", order="start-first"))
    sim.step()  # the new task of slot 1 is created beside the old one
    by_slot = {(t.slot, t.spec.container.env["V"]): t for t in sim.live()}
    assert set(by_slot) == {(1, "1"), (1, "2"), (2, "1")}
    while not by_slot[(1, "2")].status.up:
        # the old one is still wanted while the new one is not yet healthy
        assert sim.st.tasks[by_slot[(1, "1")].id].desired_state is TaskState.RUNNING
        sim.step()
        by_slot[(1, "2")] = sim.st.tasks[by_slot[(1, "2")].id]
    sim.step()
    assert sim.st.tasks[by_slot[(1, "1")].id].desired_state is TaskState.SHUTDOWN


@pytest.mark.parametrize("parallelism", [1, 2])
def test_the_delay_counts_from_when_a_slot_was_up(parallelism: int) -> None:
    """As swarmkit's `parallelism` update workers: a slot holds its worker from its new
    task's creation until `delay` after it was up (``up_at``, as the state saw it: healthy,
    not merely running), so no more than `parallelism` such spans ever overlap."""
    sim = Sim(spec(5))
    sim.update(spec(5, "2", order="start-first", delay=3.0, parallelism=parallelism))
    sim.until("completed")
    new = [t for t in sim.st.tasks.values() if t.spec.container.env["V"] == "2"]
    assert len(new) == 5
    for t in new:
        holding = [x for x in new if x is not t and x.created_at <= t.created_at
                   < x.up_at + 3.0]
        assert len(holding) < parallelism, (t, holding)


def test_a_global_start_first_update_starts_each_new_task_beside_the_old_one() -> None:
    """Global, start-first (Swarm): each node's new task starts on that node beside its old
    one, which stops once the new one is healthy; never fewer than one task up per node,
    never more than one extra per node, at most `parallelism` nodes at a time."""
    sim = Sim(global_spec(), nodes=3)
    old = {t.node_id: t.id for t in sim.live()}
    assert sorted(old) == ["n1", "n2", "n3"]
    sim.update(global_spec("2", order="start-first", parallelism=2))
    sim.step()  # two nodes get their new task, beside the old one, on the same node
    both = Counter(t.node_id for t in sim.live())
    assert sorted(both.values()) == [1, 2, 2]
    assert all(t.desired_state is TaskState.RUNNING for t in sim.st.tasks.values()
               if t.id in old.values())
    sim.until("completed")
    assert sorted((t.node_id, t.spec.container.env["V"]) for t in sim.live()) == \
        [("n1", "2"), ("n2", "2"), ("n3", "2")]
    assert not set(old.values()) & {t.id for t in sim.live()}
    assert sim.min_up >= 3 and sim.max_per_node == 2 and sim.max_running <= 3 + 2


def test_a_global_start_first_update_honours_delay_and_failure_action() -> None:
    """parallelism 1 with a delay: one node in flight at a time, the next only `delay`
    after the previous one came up; a version that never gets healthy rolls back by itself
    with the old tasks never stopped (start-first)."""
    sim = Sim(global_spec(), nodes=3)
    sim.update(global_spec("2", order="start-first", delay=3.0))
    sim.until("completed")
    new = sorted((t for t in sim.st.tasks.values() if t.spec.container.env["V"] == "2"),
                 key=lambda t: t.created_at)
    assert len(new) == 3 and sim.max_per_node == 2 and sim.max_running == 4
    for before, after in pairwise(new):
        assert after.created_at >= before.up_at + 3.0
    ok = {t.id for t in sim.live()}
    sim.update(global_spec("bad", order="start-first", failure_action="rollback"))
    sim.until("rollback_completed")
    assert {t.id for t in sim.live()} == ok and sim.min_up == 3


def test_a_global_start_first_update_stops_first_on_a_node_without_room_for_both() -> None:
    """A node whose memory holds one reserved task, not two: its old task stops first
    (start-first would wait forever for room); the update still completes."""
    gib = 1 << 30
    sim = Sim(global_spec(memory=gib), nodes=2, memory=gib + gib // 2)
    sim.update(global_spec("2", memory=gib, order="start-first", parallelism=2))
    sim.until("completed")
    assert sorted(t.spec.container.env["V"] for t in sim.live()) == ["2", "2"]
    assert sim.max_per_node == 1 and sim.min_up == 0


# ------------------------------------------------------------------ failure actions

def test_failure_action_rollback_rolls_back_by_itself_with_the_reason() -> None:
    sim = Sim(spec(3))
    old = {t.id for t in sim.live()}
    sim.update(spec(3, "bad", order="start-first", failure_action="rollback"))
    sim.until("rollback_started")
    status = sim.svc.update_status
    assert status.message.startswith("update rolled back due to failure or early "
                                     "termination of task web.1 (") and "unhealthy" in \
        status.message
    sim.until("rollback_completed")
    assert sim.svc.update_status.message == f"rollback completed ({status.message})"
    assert sim.svc.spec.task.container.env == {"V": "1"}
    assert {t.id for t in sim.live()} == old  # start-first: the old tasks never stopped
    assert sim.min_up == 3


def test_failure_action_pause_stops_after_the_first_failed_batch() -> None:
    sim = Sim(spec(4))
    sim.update(spec(4, "bad", parallelism=2, order="start-first"))
    sim.until("paused")
    sim.run(5)
    assert sim.svc.update_status.state == "paused"
    tried = {t.slot for t in sim.st.tasks.values() if t.spec.container.env["V"] == "bad"}
    assert tried <= {1, 2} and tried
    assert sim.versions() == ["1"] * 4  # the old tasks serve on
    # the next `service update` resumes (here with a fixed version)
    sim.update(spec(4, "2", parallelism=2, order="start-first"))
    sim.until("completed")
    assert sim.versions() == ["2"] * 4


@pytest.mark.parametrize("action,state", [("pause", "paused"),
                                          ("rollback", "rollback_completed")])
def test_a_one_replica_stop_first_update_that_fails_is_noticed(action: str,
                                                              state: str) -> None:
    # (the failing new task is the only task left: no old one to keep the rollout looking)
    sim = Sim(spec(1))
    sim.update(spec(1, "bad", order="stop-first", failure_action=action))
    sim.until(state)
    if action == "rollback":
        sim.run(3)
        assert sim.versions() == ["1"]


def test_a_paused_update_resumes_with_an_update_that_changes_nothing() -> None:
    sim = Sim(spec(2))
    broken = spec(2, "bad", order="start-first")
    sim.update(broken)
    sim.until("paused")
    version = sim.svc.version
    sim.update(broken)  # `service update web` with no change: resumes, and fails again
    assert (sim.svc.update_status.state, sim.svc.version) == ("updating", version)
    sim.until("paused")


def test_while_a_0_1_node_remains_only_a_template_change_resumes() -> None:
    """Schema 1: the 0.1 replicas apply the same command, and 0.1 resumed nothing without
    a template change: neither does today's state then (replicas must agree)."""
    sim = Sim(spec(2))
    sim.st.cluster = replace(sim.st.cluster, schema=1)
    broken = spec(2, "bad", order="start-first")
    sim.update(broken)
    sim.until("paused")
    sim.update(broken)
    assert sim.svc.update_status.state == "paused"


def test_failure_action_continue_goes_on_through_every_slot() -> None:
    sim = Sim(spec(4))
    new = spec(4, "bad", failure_action="continue")
    new["task"]["restart"] = {"delay": 3600.0}  # (a failed slot stays empty meanwhile)
    sim.update(new)
    sim.run(20)
    tried = {t.slot for t in sim.st.tasks.values() if t.spec.container.env["V"] == "bad"}
    assert tried == {1, 2, 3, 4}
    # every slot was given the new template: done, up or not (swarmkit's updater too; it
    # stayed `updating` for good)
    status = sim.svc.update_status
    assert status.state == "completed" and "4 of 4 tasks not up" in status.message


def test_max_failure_ratio_tolerates_that_share_of_failures() -> None:
    """Ratio 0.5 of 4 tasks: two failures are tolerated, the third pauses the update."""
    sim = Sim(spec(4))
    bad = spec(4, "bad", max_failure_ratio=0.5)
    bad["task"]["restart"] = {"delay": 3600.0}  # (each slot fails once)
    sim.update(bad)
    sim.until("paused")
    failed = [t.slot for t in sim.st.tasks.values()
              if t.spec.container.env["V"] == "bad" and t.status.state is TaskState.FAILED]
    assert sorted(failed) == [1, 2, 3]
    assert "web.3" in sim.svc.update_status.message


def test_a_rollback_that_fails_pauses_as_rollback_paused() -> None:
    sim = Sim(spec(2, "bad0"))  # (never healthy: its own tasks keep failing)
    sim.update(spec(2, "2", order="start-first"))
    sim.until("completed")
    rollback = spec(2, "bad0")
    sim.update(rollback, rollback=True)
    assert sim.svc.update_status.state == "rollback_started"
    sim.until("rollback_paused")
    assert sim.svc.update_status.message.startswith("rollback paused due to failure")


# ------------------------------------------------------------------ pure parts

@pytest.mark.parametrize(("up_at", "failed_at", "monitor", "health", "counts"), [
    (0.0, 12.0, 5.0, Health.NONE, True),        # never came up
    (10.0, 12.0, 5.0, Health.NONE, True),       # failed within the monitor window
    (10.0, 15.0, 5.0, Health.NONE, True),       # (at its end)
    (10.0, 16.0, 5.0, Health.NONE, False),      # after it: not the update's failure
    (10.0, 10.5, 0.0, Health.NONE, False),      # monitor 0: only failing to come up counts
    (10.0, 12.0, 5.0, Health.UNHEALTHY, True),  # turned unhealthy while running
])
def test_a_new_task_fails_the_rollout_before_it_is_up_or_within_the_monitor(
        up_at: float, failed_at: float, monitor: float, health: Health, counts: bool) -> None:
    state = TaskState.RUNNING if health is Health.UNHEALTHY else TaskState.FAILED
    t = Task(id="t", service_id="s1", service_name="web", slot=1,
             spec=validate_spec(spec()).task, service_version=2, node_id="n1",
             status=TaskStatus(state=state, health=health), updated_at=failed_at,
             up_at=up_at)
    assert rollout_failed(t, monitor) is counts
    stopped = replace(t, desired_state=TaskState.SHUTDOWN,
                      status=TaskStatus(state=TaskState.SHUTDOWN))
    assert not rollout_failed(stopped, monitor)  # stopped by the leader: no failure


@pytest.mark.parametrize(("failed", "updating", "ratio", "too_many"), [
    (0, 4, 0.0, False), (1, 4, 0.0, True), (1, 4, 0.25, False), (2, 4, 0.25, True),
    (2, 4, 0.5, False), (3, 4, 0.5, True), (4, 4, 1.0, False), (1, 0, 0.0, True),
])
def test_too_many_failures_is_more_than_the_ratio_of_the_tasks_updated(
        failed: int, updating: int, ratio: float, too_many: bool) -> None:
    assert too_many_failures(failed, updating, ratio) is too_many


@pytest.mark.parametrize(("action", "rolling_back", "previous", "does"), [
    ("pause", False, True, "pause"), ("continue", False, True, "continue"),
    ("rollback", False, True, "rollback"), ("rollback", False, False, "pause"),
    ("rollback", True, True, "pause"), ("continue", True, True, "continue"),
])
def test_the_failure_response(action: str, rolling_back: bool, previous: bool,
                              does: str) -> None:
    assert failure_response(action, rolling_back, previous) == does


def test_the_update_completes_once_the_monitor_window_of_the_last_task_passed() -> None:
    sim = Sim(spec(2))
    sim.update(spec(2, "2", monitor=30.0))
    steps = sim.until("completed", limit=120)
    last_up = max(t.up_at for t in sim.live())
    assert sim.svc.update_status.completed_at >= last_up + 30.0
    assert steps > 30
    # and the leader is told when to look again, rather than polling
    svc = replace(sim.svc, update_status=replace(sim.svc.update_status, state="updating"))
    tasks = list(sim.st.tasks.values())
    plan = plan_rollout(svc, tasks, lambda t: t.alive, last_up + 1.0)
    assert (plan.ops, plan.wake_at) == ([], last_up + 30.0)


def test_only_a_template_change_replaces_tasks() -> None:
    sim = Sim(spec(3))
    ids = {t.id for t in sim.live()}
    changed = spec(3, order="start-first", parallelism=3, failure_action="rollback")
    changed["labels"] = {"tier": "front"}
    changed["rollback"] = {"monitor": 1.0}
    sim.update(changed)
    sim.run(5)
    assert {t.id for t in sim.st.tasks.values()} == ids
    assert sim.svc.update_status.state == ""


# ------------------------------------------------------------------ the state machine

def test_a_task_records_when_it_first_came_up() -> None:
    sim = Sim(spec(1))
    (t,) = sim.live()
    assert t.status.up and t.up_at == t.created_at + 1.0  # running at once, healthy 1 s later
    sim.update(spec(1, "2", order="start-first"))
    sim.step()  # (created beside the old task, and running: its check is starting)
    starting = next(x for x in sim.live() if x.id != t.id)
    assert starting.status.health is Health.STARTING and starting.up_at == 0.0


def test_specs_and_states_stored_before_these_fields_load_with_the_defaults() -> None:
    old = {"name": "web", "task": {"container": {"command": ["x"]}},
           "update": {"parallelism": 2, "delay": 1.0}, "rollback": {"parallelism": 3}}
    s = validate_spec(old)
    assert s.update == UpdateConfig(parallelism=2, delay=1.0)
    assert (s.update.order, s.update.failure_action, s.update.monitor,
            s.update.max_failure_ratio) == ("stop-first", "pause", 5.0, 0.0)
    assert s.rollback == RollbackConfig(parallelism=3)
    sim = Sim(spec(1))
    raw = msgpack.unpackb(state_to_bytes(sim.st), raw=False, strict_map_key=False)
    for t in raw["tasks"].values():
        del t["up_at"]
    for svc in raw["services"].values():
        for key in ("failure_action", "monitor", "max_failure_ratio", "order"):
            del svc["spec"]["update"][key]
            del svc["spec"]["rollback"][key]
    st = state_from_plain(raw)
    assert {t.up_at for t in st.tasks.values()} == {0.0}
    assert st.services["s1"].spec.update.monitor == 5.0


def test_bad_update_config_values_name_their_field() -> None:
    for field, value in (("order", "sideways"), ("failure_action", "retry"),
                         ("max_failure_ratio", 1.5), ("monitor", -1.0)):
        with pytest.raises(ValidationError) as err:
            validate_spec({**spec(), "update": {field: value}})
        assert err.value.field == f"update.{field}"
    with pytest.raises(ValidationError) as err:  # a rollback cannot roll back
        validate_spec({**spec(), "rollback": {"failure_action": "rollback"}})
    assert err.value.field == "rollback.failure_action"


# ------------------------------------------------------------------ the CLI

def _update(*argv: str) -> dict[str, Any]:
    args = _subparser("update").parse_args([*argv, "web"])
    current = msgspec.to_builtins(validate_spec(spec()))
    return specflags.apply_update_args(current, args)


def test_the_update_flags() -> None:
    got = _update("--update-order", "start-first", "--update-failure-action", "rollback",
                  "--update-monitor", "1m30s", "--update-max-failure-ratio", "0.25",
                  "--rollback-order", "start-first", "--rollback-failure-action", "continue",
                  "--rollback-monitor", "500ms", "--rollback-max-failure-ratio", "1")
    assert {k: got["update"][k] for k in ("order", "failure_action", "monitor",
                                          "max_failure_ratio")} == \
        {"order": "start-first", "failure_action": "rollback", "monitor": 90.0,
         "max_failure_ratio": 0.25}
    assert {k: got["rollback"][k] for k in ("order", "failure_action", "monitor",
                                            "max_failure_ratio")} == \
        {"order": "start-first", "failure_action": "continue", "monitor": 0.5,
         "max_failure_ratio": 1.0}
    with pytest.raises(SystemExit):  # argparse: "invalid choice" naming the flag
        _update("--rollback-failure-action", "rollback")
    with pytest.raises(CliError, match="--update-monitor"):
        _update("--update-monitor", "soon")
    with pytest.raises(CliError, match="--update-max-failure-ratio"):
        _update("--update-max-failure-ratio", "half")


def test_the_update_deltas_exist_and_args_sets_the_command() -> None:
    options = {o for a in _subparser("update")._actions for o in a.option_strings}
    for flag in ("--publish-add", "--publish-rm", "--secret-add", "--secret-rm",
                 "--config-add", "--config-rm", "--mount-add", "--mount-rm", "--label-add",
                 "--label-rm", "--args", "--image", "--rollback"):
        assert flag in options, flag
    got = _update("--args", "srv --port 80 'two words'")
    assert got["task"]["container"]["command"] == ["srv", "--port", "80", "two words"]
    args = _subparser("update").parse_args(["--args", "x", "web"])
    args.command = ["y"]  # (what shoal.cli.main.split_update_command takes from after `--`)
    with pytest.raises(CliError, match="--args"):
        specflags.apply_update_args(msgspec.to_builtins(validate_spec(spec())), args)
    # a secret rotation keeps the file name: the old one out, the new one in
    current = msgspec.to_builtins(validate_spec(
        {**spec(), "task": {"container": {"command": ["x"], "secrets": [
            {"name": "old", "target": "app"}]}}}))
    args = _subparser("update").parse_args(["--secret-rm", "old", "--secret-add",
                                            "new,target=app", "web"])
    got = specflags.apply_update_args(current, args)
    assert [(s["name"], s["target"]) for s in got["task"]["container"]["secrets"]] == \
        [("new", "app")]
    assert _subparser("update").parse_args(["--rollback", "web"]).rollback is True
    # an option after the service name is an option, not a new command
    args = _subparser("update").parse_args(["web", "--secret-rm", "old"])
    got = specflags.apply_update_args(current, args)
    assert list(got["task"]["container"]["command"]) == ["x"]
    assert not got["task"]["container"].get("secrets")


# ------------------------------------------------------- found by a review against swarmkit

def test_stop_first_waits_for_the_old_task_to_stop_before_the_new_one_runs() -> None:
    """Stop-first never runs a slot's old and new task at once, even when the old one takes
    its whole grace period to stop (a port or a volume may be the task's own): the
    replacement is made once the old task ended (swarmkit's restart supervisor waits the
    same way)."""
    sim = Sim(spec(2))
    sim.stop_steps = 5
    sim.max_per_slot = 0
    sim.update(spec(2, "2"))
    sim.until("completed", 120)
    assert sim.max_per_slot == 1 and sim.max_running <= 2
    assert sim.versions() == ["2", "2"]


def test_a_slot_whose_task_never_reports_its_stop_is_refilled_after_a_minute() -> None:
    from shoal.node.orchestrator import OLD_TASK_TIMEOUT
    sim = Sim(spec(1))
    sim.stop_steps = 10**6  # the agent never reports the stop
    sim.update(spec(1, "2"))
    sim.run(int(OLD_TASK_TIMEOUT) - 5)
    assert sim.versions() == []  # the old one still holds the slot
    sim.run(10)
    assert sim.versions() == ["2"]


def test_an_automatic_rollback_refills_slots_whose_policy_said_no_more() -> None:
    """With restart condition none (or attempts used up), a rollback — a new version — runs
    its slots again (swarmkit starts a spec version's restart history afresh); it used to
    leave the service at 0 tasks, rollback_started for good."""
    for restart in ({"condition": "none", "delay": 0.0}, {"max_attempts": 1, "delay": 0.0}):
        base = spec(1)
        base["task"]["restart"] = restart
        sim = Sim(base)
        bad = spec(1, "bad", failure_action="rollback", monitor=5.0)
        bad["task"]["restart"] = restart
        sim.update(bad)
        sim.until("rollback_completed", 60)
        assert sim.versions() == ["1"], restart


def test_an_update_reruns_a_slot_that_gave_up_and_completes() -> None:
    """A slot that used up its restart attempts runs again after `service update` (also
    --force), and the update completes; it used to stay empty, `updating` for good."""
    base = spec(2, "bad0")
    base["task"]["restart"] = {"max_attempts": 1, "delay": 0.0}
    sim = Sim(base)
    sim.run(20)
    assert sim.live() == []
    good = spec(2, "2")
    good["task"]["restart"] = {"max_attempts": 1, "delay": 0.0}
    sim.update(good)
    sim.until("completed", 60)
    assert sim.versions() == ["2", "2"]
    forced = {**good, "task": {**good["task"], "force_update": 1}}
    sim.update(forced)
    sim.until("completed", 60)


def test_a_global_update_leaves_a_paused_nodes_task_as_it_is() -> None:
    """Swarm adds or updates no task on a paused node: its task keeps the old template and
    the rollout completes without it (it used to stop it, or start a new one beside it)."""
    for order in ("stop-first", "start-first"):
        sim = Sim(global_spec(), nodes=3)
        sim.st.apply({"op": "node_update", "id": "n3", "now": sim.now,
                      "availability": "pause"})
        sim.update(global_spec("2", order=order))
        sim.until("completed", 60)
        by_node = {t.node_id: t.spec.container.env["V"] for t in sim.live()}
        assert by_node == {"n1": "2", "n2": "2", "n3": "1"}, (order, by_node)


def test_a_proposer_whose_clock_runs_ahead_does_not_hide_the_rollouts_failures() -> None:
    """`update_status.started_at` comes from the proposing manager's clock, the tasks'
    creation from the leader's; with the proposer 10 minutes ahead no new task counted, so
    a failing version stayed deployed. The start is kept no later than just after the
    service's newest task."""
    sim = Sim(spec(2))
    sim.now += 1
    res = sim.st.apply({"op": "service_update", "id": "s1", "now": sim.now + 600,
                        "spec": spec(2, "bad", failure_action="rollback")})
    assert "error" not in res
    sim.until("rollback_completed", 60)
    assert sim.versions() == ["1", "1"]
    assert sim.svc.update_status.started_at < sim.now  # (moved back to the leader's time)
    # the leader's rollout_start op is schema 6's: an older replica refuses it, so a
    # cluster still writing 5 is sent none (and refuses one, as the older code does)
    sim = Sim(spec(2))
    sim.st.cluster = replace(sim.st.cluster, schema=5)
    res = sim.st.apply({"op": "leader", "term": 1, "now": sim.now,
                        "ops": [("rollout_start", "s1", 1.0)]})
    assert "unknown leader op 'rollout_start'" in res["error"]["message"]
    sim.now += 1
    sim.st.apply({"op": "service_update", "id": "s1", "now": sim.now + 600,
                  "spec": spec(2, "2")})
    ops, _ = reconcile_services(sim.st.snapshot(), sim.now, lambda: "x", OrchestratorConfig())
    assert not any(op[0] == "rollout_start" for op in ops)


def test_an_automatic_rollback_leaves_no_previous_spec() -> None:
    """As Swarm: after an automatic rollback there is nothing to roll back to (a manual
    `service rollback` would bring back the version that just failed); a cluster still
    writing schema 5 keeps the old rule, as its older replicas apply it."""
    sim = Sim(spec(1))
    sim.update(spec(1, "bad", failure_action="rollback"))
    sim.until("rollback_completed", 60)
    assert sim.svc.previous_spec is None
    sim = Sim(spec(1))
    sim.st.cluster = replace(sim.st.cluster, schema=5)
    sim.update(spec(1, "bad", failure_action="rollback"))
    sim.until("rollback_completed", 60)
    assert sim.svc.previous_spec is not None
