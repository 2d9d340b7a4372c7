"""Horizontal autoscaling (`--autoscale`, shoal.node.autoscale) without a network: the HPA
decision as a pure function (tolerance, clamp, stabilisation, step, no flapping), the usage
arithmetic over cgroup samples, the spec and CLI rules, and the state machine's side
(replica change, decision record, event, manual scale refused). Each test names the
property it checks."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import random
from typing import Any

import pytest

from shoal.cli.errors import CliError
from shoal.cli.flagvalues import parse_autoscale
from shoal.cli.specflags import add_update_flags, apply_update_args
from shoal.node.autoscale import Autoscaler, Sample, cpu_usage, decide, recommend
from shoal.node.events import derive
from shoal.raft.errors import ValidationError
from shoal.raft.models import Health, TaskState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.spec import Autoscale
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec

AUTO = Autoscale(min=1, max=10, cpu=0.5, stabilization=300.0, period=15.0)


def run(auto: Autoscale, current: int, usage: float, history: list[tuple[float, int]],
        now: float, tasks: int | None = None) -> int:
    d, rec = decide(auto, current, [usage] * (current if tasks is None else tasks), [],
                    history, now)
    history.append((now, rec))
    return d.desired


def test_hpa_rule_ceil_of_current_times_ratio_outside_the_tolerance_band() -> None:
    assert recommend(2, [0.6, 0.6], 0.5, 0.1)[0] == 3  # ratio 1.2: ceil(2.4)
    assert recommend(4, [1.0] * 4, 0.5, 0.1)[0] == 8
    assert recommend(4, [0.54] * 4, 0.5, 0.1)[0] == 4  # ratio 1.08: within ±10 %
    assert recommend(4, [0.46] * 4, 0.5, 0.1)[0] == 4  # ratio 0.92: within
    assert recommend(4, [0.2] * 4, 0.5, 0.1)[0] == 2  # ratio 0.4: ceil(1.6)


def test_unmeasured_starting_tasks_count_zero_up_and_target_down() -> None:
    """3 replicas, 1 measured at 100 % of a 50 % target: the 2 starting ones count as 0 %
    when scaling up (ratio 2/3: no scale-up on top of the one still starting)."""
    assert recommend(3, [1.0], 0.5, 0.1)[0] == 3
    assert recommend(3, [1.5], 0.5, 0.1)[0] == 3  # ratio 1.0 once the others count 0
    assert recommend(3, [3.0], 0.5, 0.1)[0] == 6
    # scaling down: the unmeasured count as the target (no guess removes tasks)
    assert recommend(3, [0.0], 0.5, 0.1)[0] == 2


def test_desired_is_clamped_to_min_and_max() -> None:
    auto = Autoscale(min=2, max=3, cpu=0.5, stabilization=0)
    assert run(auto, 2, 5.0, [], 0.0) == 3
    assert run(auto, 3, 0.0, [], 0.0) == 2
    d, _ = decide(auto, 1, [], [], [], 0.0)  # below min with nothing measured yet
    assert d.desired == 2 and "clamped" in d.reason


def test_scale_down_waits_for_the_stabilisation_window_and_scale_up_does_not() -> None:
    auto = Autoscale(min=1, max=10, cpu=0.5, stabilization=60.0)
    hist: list[tuple[float, int]] = []
    assert run(auto, 2, 1.0, hist, 0.0) == 4  # up at once
    # the load stops: the recommendation is 1, but 4 was recommended within 60 s
    assert run(auto, 4, 0.0, hist, 15.0) == 4
    assert run(auto, 4, 0.0, hist, 45.0) == 4
    assert run(auto, 4, 0.0, hist, 61.0) == 1  # the high one has left the window


def test_step_limits_the_change_per_period() -> None:
    auto = Autoscale(min=1, max=100, cpu=0.1, step=2, stabilization=0)
    assert run(auto, 2, 1.0, [], 0.0) == 4
    assert run(auto, 10, 0.0, [], 0.0) == 8
    default = Autoscale(min=1, max=100, cpu=0.1, stabilization=0)  # up max(4, current)
    assert run(default, 2, 1.0, [], 0.0) == 6
    assert run(default, 10, 1.0, [], 0.0) == 20
    assert run(default, 10, 0.0, [], 0.0) == 1  # down: no step limit by default


def test_no_flapping_under_noisy_steady_load() -> None:
    """A steady load (4 tasks at the target) with ±20 % noise per task per sample, decided
    every 15 s for an hour: after the first minutes the count settles and never goes down
    and up again (the tolerance and the stabilisation absorb the noise)."""
    rng = random.Random(7)
    auto = Autoscale(min=1, max=20, cpu=0.5)
    total_load, current, hist = 2.0, 4, []  # 2 CPUs of work spread over the tasks
    counts = []
    for i in range(240):
        per_task = total_load / current
        usages = [max(0.0, per_task * (1 + rng.uniform(-0.2, 0.2))) for _ in range(current)]
        d, rec = decide(auto, current, usages, [], hist, i * 15.0)
        hist.append((i * 15.0, rec))
        current = d.desired
        counts.append(current)
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    assert changes <= 2, counts
    assert 4 <= counts[-1] <= 6


def test_cpu_usage_is_the_window_rate_as_a_fraction_of_the_limit() -> None:
    samples = [Sample(at=t, cpu_seconds=0.2 * t, memory_bytes=None) for t in range(0, 61, 5)]
    assert cpu_usage(samples, 30.0, 60.0, 0.2) == pytest.approx(1.0)
    assert cpu_usage(samples, 30.0, 60.0, 1.0) == pytest.approx(0.2)
    assert cpu_usage(samples[:1], 30.0, 60.0, 1.0) is None  # one sample: no rate yet


# ------------------------------------------------------------------ spec and CLI

@pytest.mark.parametrize(("mode", "auto", "field", "words"), [
    ("global", {"max": 3, "cpu": 0.5}, "mode.autoscale", "--autoscale is for replicated"),
    ("replicated-job", {"max": 3, "cpu": 0.5}, "mode.autoscale", "replicated services"),
    ("replicated", {"min": 4, "max": 3, "cpu": 0.5}, "mode.autoscale.min", "above max"),
    ("replicated", {"max": 3}, "mode.autoscale.cpu", "give a target"),
    ("replicated", {"max": 3, "memory": 0.7}, "mode.autoscale.memory", "--limit-memory"),
])
def test_a_bad_autoscale_is_refused_naming_its_field(mode: str, auto: dict[str, Any],
                                                     field: str, words: str) -> None:
    spec = {"name": "w", "mode": {"type": mode, "autoscale": auto},
            "task": {"container": {"command": ["x"]}}}
    with pytest.raises(ValidationError) as err:
        validate_spec(spec)
    assert err.value.field == field and words in err.value.message, err.value


def test_autoscale_flag_parses_percentages_durations_and_none() -> None:
    assert parse_autoscale("min=2,max=20,cpu=60%,memory=0.7,window=10s,stabilization=5m,"
                           "period=5s,step=3,tolerance=5%") == {
        "min": 2, "max": 20, "cpu": 0.6, "memory": 0.7, "window": 10.0,
        "stabilization": 300.0, "period": 5.0, "step": 3, "tolerance": 0.05}
    assert parse_autoscale("none") == {}
    with pytest.raises(CliError, match="unknown option"):
        parse_autoscale("min=1,maxi=3")
    with pytest.raises(CliError, match="percentage"):
        parse_autoscale("max=3,cpu=lots")


def test_service_update_merges_autoscale_keys_and_rm_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_update_flags(parser)
    current = {"name": "w", "mode": {"autoscale": {"min": 1, "max": 3, "cpu": 0.5}}}
    new = apply_update_args(current, parser.parse_args(["--autoscale", "max=6"]))
    assert new["mode"]["autoscale"] == {"min": 1, "max": 6, "cpu": 0.5}
    off = apply_update_args(current, parser.parse_args(["--autoscale-rm"]))
    assert off["mode"]["autoscale"] == {}


# ------------------------------------------------------------------ state machine

def _state_with_service() -> tuple[ClusterState, str]:
    st = ClusterState()
    st.cluster = dataclasses.replace(st.cluster, schema=SCHEMA)  # (every node on today's)
    spec = {"name": "w", "mode": {"replicas": 1, "autoscale": {"min": 1, "max": 3,
                                                               "cpu": 0.5}},
            "task": {"container": {"command": ["x"]}, "resources": {"limits": {"cpu": 0.2}}}}
    assert st.apply({"op": "service_create", "id": "s1", "spec": spec, "now": 1.0})["ok"]
    return st, "s1"


def test_manual_scale_of_an_autoscaled_service_is_refused_naming_autoscale() -> None:
    st, sid = _state_with_service()
    res = st.apply({"op": "service_update", "id": sid, "replicas": 5, "now": 2.0})
    assert "--autoscale" in res["error"]["message"], res
    spec = to_dict(st.services[sid].spec)
    spec["mode"]["replicas"] = 2
    res = st.apply({"op": "service_update", "id": sid, "spec": spec, "now": 2.0})
    assert "autoscaled" in res["error"]["message"], res
    spec["mode"]["autoscale"] = {}  # turning it off and scaling in one update is allowed
    assert st.apply({"op": "service_update", "id": sid, "spec": spec, "now": 2.0})["ok"]
    assert st.services[sid].spec.mode.replicas == 2


def test_a_decision_changes_replicas_records_its_inputs_and_is_an_event() -> None:
    st, sid = _state_with_service()
    before = st.snapshot()
    decision = {"current": 1, "desired": 3, "usage": 1.2, "target": 0.5, "metric": "cpu",
                "tasks": 1, "reason": "cpu 120% of target 50% over 1 task(s): scale up"}
    cmd = {"op": "leader", "term": 1, "now": 5.0, "ops": [("autoscale", sid, 3, decision)]}
    assert st.apply(cmd)["ok"]
    svc = st.services[sid]
    assert svc.spec.mode.replicas == 3
    assert svc.autoscale.decisions[-1].reason.endswith("scale up")
    assert svc.autoscale.decisions[-1].at == 5.0
    events = [e for e in derive(before, cmd, st.snapshot(), st.index)
              if e.action == "autoscale"]
    assert len(events) == 1 and events[0].attributes["desired"] == 3


def test_the_leader_autoscaler_scales_up_from_sampled_cgroup_usage() -> None:
    """Autoscaler.plan over a real ClusterState, with the tasks' cpu_seconds given by a
    stand-in for the nodes' usage endpoint: one task burning its 0.2 CPU limit → 3."""
    st, sid = _state_with_service()
    st.apply({"op": "node_add", "node": {"id": "n1", "hostname": "h", "addr": "10.0.0.1",
                                         "api_port": 1, "raft_port": 2, "role": "manager"},
              "now": 1.0})
    task = {"id": "t1", "service_id": sid, "service_name": "w", "slot": 1,
            "spec": to_dict(st.services[sid].spec.task), "service_version": 1,
            "desired_state": int(TaskState.RUNNING), "node_id": "",
            "status": {"state": int(TaskState.NEW)}}
    st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": [("create", task),
                                                               ("assign", "t1", "n1")]})
    st.apply({"op": "task_status", "task_id": "t1", "node_id": "n1", "now": 3.0,
              "status": {"state": int(TaskState.RUNNING), "health": str(Health.NONE)}})
    clock = {"t": 0.0}

    async def usage(by_node: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        assert by_node == {"n1": ["t1"]}
        return {"t1": {"cpu_seconds": 0.2 * clock["t"], "memory_bytes": 1 << 20}}

    scaler = Autoscaler(usage)
    ops: list[Any] = []
    for step in range(0, 40):
        clock["t"] = step * 1.0
        ops += asyncio.run(scaler.plan(st.snapshot(), clock["t"]))
    assert ops and ops[0][:3] == ("autoscale", sid, 2), ops  # 100% of 50%: x2 → 2
    assert ops[0][3]["usage"] == pytest.approx(1.0, abs=0.01)


def test_starting_and_unhealthy_tasks_do_not_count() -> None:
    from shoal.node.autoscale import counted
    from shoal.raft.models import Task, TaskStatus
    from shoal.raft.spec import TaskSpec

    def task(state: TaskState, health: Health) -> Task:
        return Task(id="t", service_id="s", service_name="w", slot=1, spec=TaskSpec(),
                    service_version=1, node_id="n1",
                    status=TaskStatus(state=state, health=health))

    assert counted(task(TaskState.RUNNING, Health.NONE))
    assert counted(task(TaskState.RUNNING, Health.HEALTHY))
    assert not counted(task(TaskState.RUNNING, Health.STARTING))
    assert not counted(task(TaskState.RUNNING, Health.UNHEALTHY))
    assert not counted(task(TaskState.STARTING, Health.NONE))


# ------------------------------------------------------------------ rollbacks and the range

def _updated_then_scaled(schema: int = SCHEMA) -> tuple[ClusterState, str]:
    """An autoscaled service updated to a new image, then scaled up by the autoscaler."""
    st, sid = _state_with_service()
    st.cluster = dataclasses.replace(st.cluster, schema=schema)
    spec = to_dict(st.services[sid].spec)
    spec["task"]["container"]["image"] = "app:broken"
    assert st.apply({"op": "service_update", "id": sid, "spec": spec, "now": 3.0})["ok"]
    d = {"current": 1, "desired": 3, "usage": 1.0, "target": 0.5, "metric": "cpu",
         "tasks": 1, "reason": "scale up"}
    assert st.apply({"op": "leader", "term": 1, "now": 4.0, "ops": [("autoscale", sid, 3, d)]}
                    )["ok"]
    return st, sid


def test_an_automatic_rollback_keeps_the_autoscalers_replica_count() -> None:
    """The failure action rolls the template back, not the load: 3 replicas stay 3 (before:
    the previous spec's 1, at once, past the stabilisation window). A schema-10 cluster
    keeps the older rule, as its older replicas apply it."""
    for schema, replicas in ((SCHEMA, 3), (10, 1)):
        st, sid = _updated_then_scaled(schema)
        assert st.apply({"op": "leader", "term": 1, "now": 5.0,
                         "ops": [("rollback", sid, "update failed")]})["ok"]
        svc = st.services[sid]
        assert svc.spec.task.container.image == "" and svc.spec.mode.replicas == replicas


def test_an_autoscale_op_is_clamped_to_the_range_in_force_when_applied() -> None:
    """A decision planned before `update --autoscale max=2` is applied within the new range
    (before: 3 tasks made, then removed by the next pass)."""
    st, sid = _state_with_service()
    spec = to_dict(st.services[sid].spec)
    spec["mode"]["autoscale"]["max"] = 2
    assert st.apply({"op": "service_update", "id": sid, "spec": spec, "now": 2.0})["ok"]
    d = {"current": 1, "desired": 3, "usage": 1.0, "target": 0.5, "metric": "cpu",
         "tasks": 1, "reason": "scale up"}
    assert st.apply({"op": "leader", "term": 1, "now": 3.0, "ops": [("autoscale", sid, 3, d)]}
                    )["ok"]
    assert st.services[sid].spec.mode.replicas == 2


async def test_service_rollback_of_an_autoscaled_service_keeps_its_replicas(
        tmp_path: Any) -> None:
    """`service rollback` after the autoscaler moved the count (before: refused, "service
    w is autoscaled ... turn autoscaling off first" — a bad image could not be rolled back)."""
    from test_modes import Lab

    lab = Lab(tmp_path)
    await lab.boot(1)
    spec = {"name": "w", "mode": {"replicas": 1, "autoscale": {"min": 1, "max": 5,
                                                               "cpu": 0.5}},
            "task": {"container": {"command": ["x"]}, "resources": {"limits": {"cpu": 0.2}}}}
    await lab.services.create_service(spec)
    spec["task"]["container"]["env"] = {"V": "broken"}
    await lab.services.update_service("w", spec, None)
    svc = lab.store.snapshot().service_by_name("w")
    assert svc is not None
    d = {"current": 1, "desired": 4, "usage": 1.0, "target": 0.5, "metric": "cpu",
         "tasks": 1, "reason": "scale up"}
    await lab.ctx.propose({"op": "leader", "term": 1, "now": 10.0,
                           "ops": [("autoscale", svc.id, 4, d)]})
    await lab.services.rollback_service("w")
    svc = lab.store.snapshot().service_by_name("w")
    assert svc is not None and svc.spec.mode.replicas == 4
    assert svc.spec.task.container.env == {} and svc.update_status.state == "rollback_started"


async def test_an_autoscale_without_max_is_refused_by_the_api(tmp_path: Any) -> None:
    """max is what turns it on: a spec naming min and a target without it would be
    autoscaling silently off (the CLI asks for max; the API now too)."""
    from test_modes import Lab

    from shoal.node.errors import BadRequest

    lab = Lab(tmp_path)
    await lab.boot(1)
    with pytest.raises(BadRequest) as exc:
        await lab.services.create_service({"name": "w", "mode": {"autoscale": {
            "min": 2, "cpu": 0.6}}, "task": {"container": {"command": ["x"]}}})
    assert exc.value.field == "mode.autoscale.max"


def test_a_target_without_its_percent_sign_is_refused_not_read_as_thousands() -> None:
    """`cpu=60` (Kubernetes' averageUtilization) was a 6,000 % target: never reached, the
    service only ever scaled down to min."""
    with pytest.raises(CliError, match=r"cpu=60: write a percentage, cpu=60%"):
        parse_autoscale("min=2,max=20,cpu=60")
    assert parse_autoscale("min=2,max=20,cpu=0.6,memory=70%")["cpu"] == 0.6
