"""Scheduled jobs (`--schedule CRON`, shoal.node.cron) without a network: the spec's rules,
the cron arithmetic, and the leader's passes on the in-memory store with a clock the test
sets (node/leader.py plan_pass → the state machine → each node's worker on a fake runtime).
Each test names the property it checks."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_modes import Lab, job

from shoal.node.cron import due_time, next_time
from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.raft.errors import ValidationError
from shoal.raft.models import TaskState, to_dict
from shoal.raft.spec import Schedule
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.raft.wire import state_from_plain

EVERY_5S = "*/5 * * * * *"


def ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


def test_cron_times_follow_five_and_six_field_expressions_macros_and_time_zones() -> None:
    """5 fields (minutes), 6 with the seconds first, macros, and a zone other than UTC; the
    run due is the latest time in (since, now], a time exactly now included."""
    s = Schedule(cron="*/15 * * * *")
    assert next_time(s, ts("2026-12-04 10:07:00")) == ts("2026-12-04 10:15:00")
    assert next_time(Schedule(cron=EVERY_5S), ts("2026-12-04 10:07:01.5")) == \
        ts("2026-12-04 10:07:05")
    assert next_time(Schedule(cron="@daily"), ts("2026-12-04 10:07:00")) == \
        ts("2026-12-05 00:00:00")
    assert next_time(Schedule(cron="@hourly"), ts("2026-12-04 10:07:00")) == \
        ts("2026-12-04 11:00:00")
    paris = Schedule(cron="0 12 * * *", timezone="Europe/Paris")  # 12:00 CET = 11:00 UTC
    assert next_time(paris, ts("2026-12-04 10:00:00")) == ts("2026-12-04 11:00:00")
    # due: the latest missed time only (a run missed is started once, late)
    assert due_time(s, ts("2026-12-04 10:00:00"), ts("2026-12-04 10:50:00")) == \
        ts("2026-12-04 10:45:00")
    assert due_time(s, ts("2026-12-04 10:45:00"), ts("2026-12-04 10:50:00")) is None
    assert due_time(s, ts("2026-12-04 10:40:00"), ts("2026-12-04 10:45:00")) == \
        ts("2026-12-04 10:45:00")


@pytest.mark.parametrize(("mode", "schedule", "field", "words"), [
    ("replicated", {"cron": "@hourly"}, "mode.schedule.cron", "needs --mode replicated-job"),
    ("global", {"cron": "@hourly"}, "mode.schedule.cron", "global-job"),
    ("replicated-job", {"cron": "* * *"}, "mode.schedule.cron", "has 3 fields"),
    ("replicated-job", {"cron": "61 * * * *"}, "mode.schedule.cron", "out of range"),
    ("replicated-job", {"cron": "* * * * * * *"}, "mode.schedule.cron", "has 7 fields"),
    ("replicated-job", {"cron": "@reboot"}, "mode.schedule.cron", "@reboot"),
    ("replicated-job", {"cron": "0 0 30 2 *"}, "mode.schedule.cron", "gives no time"),
    ("replicated-job", {"cron": "@hourly", "timezone": "Mars/Olympus"},
     "mode.schedule.timezone", "unknown time zone"),
    ("replicated-job", {"timezone": "UTC"}, "mode.schedule.timezone", "give --schedule"),
    ("replicated-job", {"cron": "@hourly", "policy": "skip"}, "mode.schedule.policy",
     "invalid enum value"),
    ("replicated-job", {"starting_deadline": 60}, "mode.schedule.starting_deadline",
     "give --schedule"),
    ("replicated-job", {"cron": "@hourly", "starting_deadline": -1},
     "mode.schedule.starting_deadline", ">= 0"),
    ("replicated-job", {"cron": "@hourly", "history": 0}, "mode.schedule.history", ">= 1"),
])
def test_a_bad_schedule_is_refused_naming_its_field(mode: str, schedule: dict[str, Any],
                                                     field: str, words: str) -> None:
    spec = {"name": "j", "mode": {"type": mode, "schedule": schedule},
            "task": {"container": {"command": ["x"]}}}
    with pytest.raises(ValidationError) as err:
        validate_spec(spec)
    assert err.value.field == field and words in err.value.message, err.value


def test_a_good_schedule_is_accepted_with_its_defaults() -> None:
    spec = validate_spec({"name": "j", "mode": {"type": "global-job", "schedule": {
        "cron": EVERY_5S}}, "task": {"container": {"command": ["x"]}}})
    assert spec.mode.scheduled and spec.mode.schedule.policy == "forbid"
    assert spec.mode.schedule.history == 5 and not spec.mode.schedule.timezone


# --------------------------------------------------------------------------- leader passes

async def step(lab: Lab, now: float, term: int = 1) -> list[Any]:
    """One leader pass at wall-clock ``now`` (proposed as that term's batch), then every
    worker's pass; the pass's ops."""
    ops, _ = plan_pass(lab.store.snapshot(), {}, 0.0, now, OrchestratorConfig(),
                       liveness=False)
    if ops:
        await lab.ctx.propose({"op": "leader", "term": term, "now": now, "ops": ops})
    for w in lab.workers.values():
        await w.reconcile()
        await w.wait_started()
    return ops


async def finish(lab: Lab, name: str, now: float) -> None:
    """The one live task of ``name`` exits 0; the worker reports it, the leader goes on."""
    (t,) = lab.live(name)
    lab.exit(t, 0)
    await step(lab, now)
    await step(lab, now)


def runs(lab: Lab, name: str) -> list[dict[str, Any]]:
    return lab.view(name)["schedule"]["runs"]


def scheduled_job(name: str, policy: str = "forbid", history: int = 3, **mode: Any
                  ) -> dict[str, Any]:
    spec = job(name, "replicated-job", **mode)
    spec["mode"]["schedule"] = {"cron": EVERY_5S, "policy": policy, "history": history}
    return spec


async def test_a_scheduled_job_runs_at_its_times_skips_overlaps_and_keeps_its_history(
        tmp_path: Path) -> None:
    """Nothing runs on create; at each time of the schedule a new run starts (2 completions,
    1 at a time); a time that comes while the run still goes is skipped (policy forbid) and
    recorded; each run's counts and state are kept, the last 3 runs only; `service ls`
    shows the next run time."""
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.services.create_service(scheduled_job("cj", replicas=2, max_concurrent=1))
    created = lab.store.snapshot().service_by_name("cj").created_at  # type: ignore[union-attr]
    first = next_time(Schedule(cron=EVERY_5S), created)
    assert await step(lab, created + 0.01) == []
    assert lab.tasks("cj") == [] and lab.view("cj")["schedule"]["last_run"] is None
    assert lab.view("cj")["schedule"]["next_run"] == first

    await step(lab, first + 0.1)  # run 1 starts: one task (max_concurrent 1)
    assert [t.status.state for t in lab.live("cj")] == [TaskState.RUNNING]
    assert [(r["scheduled_at"], r["state"]) for r in runs(lab, "cj")] == \
        [(first, "running")]
    await step(lab, first + 5.1)  # run 1 still going: the next time is skipped
    assert [r["state"] for r in runs(lab, "cj")] == ["running", "skipped"]
    assert "still running (policy forbid)" in runs(lab, "cj")[1]["message"]
    assert len(lab.live("cj")) == 1
    for _ in range(2):  # run 1's two completions, one after the other
        await finish(lab, "cj", first + 6)
    assert lab.live("cj") == []
    r1 = runs(lab, "cj")[0]
    assert (r1["state"], r1["completed"], r1["failed"]) == ("completed", 2, 0)
    assert r1["finished_at"] >= r1["started_at"] > 0
    assert lab.view("cj")["completed"] == 2

    for k in (2, 3):  # two more runs: each starts at its time, with new tasks
        at = first + 5 * k
        await step(lab, at + 0.2)
        assert len(lab.live("cj")) == 1 and lab.view("cj")["completed"] == 0
        for _ in range(2):
            await finish(lab, "cj", at + 1)
    kept = runs(lab, "cj")
    assert [(r["scheduled_at"] - first, r["state"], r["completed"]) for r in kept] == \
        [(5, "skipped", 0), (10, "completed", 2), (15, "completed", 2)]
    assert lab.view("cj")["schedule"]["next_run"] == first + 20
    index = lab.store.index
    await step(lab, first + 19)  # between two times: nothing to do
    assert lab.store.index == index


async def test_policy_allow_starts_a_run_while_the_previous_one_runs_on(
        tmp_path: Path) -> None:
    """With allow, the run due while the previous still runs starts beside it; the earlier
    run's task is not stopped, and each run ends with its own count."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(scheduled_job("ov", policy="allow"))
    created = lab.store.snapshot().service_by_name("ov").created_at  # type: ignore[union-attr]
    first = next_time(Schedule(cron=EVERY_5S), created)
    await step(lab, first + 0.1)
    (old,) = lab.live("ov")
    await step(lab, first + 5.1)
    live = lab.live("ov")
    assert len(live) == 2 and old.id in {t.id for t in live}
    assert sorted(t.job_iteration for t in live) == [1, 2]
    assert [r["state"] for r in runs(lab, "ov")] == ["running", "running"]
    for t in live:
        lab.exit(t, 0)
    await step(lab, first + 6)
    await step(lab, first + 6.5)
    assert [(r["state"], r["completed"]) for r in runs(lab, "ov")] == \
        [("completed", 1), ("completed", 1)]


async def test_a_run_is_started_once_whichever_leader_proposes_it(tmp_path: Path) -> None:
    """Two leaders (an old one still believing it leads, and its successor) decide the same
    run from the same state: the run starts once (its scheduled time identifies it), and a
    later pass of the new leader starts no other; a stale term is refused whole."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(scheduled_job("once"))
    created = lab.store.snapshot().service_by_name("once").created_at  # type: ignore
    first = next_time(Schedule(cron=EVERY_5S), created)
    snap = lab.store.snapshot()
    old, _ = plan_pass(snap, {}, 0.0, first + 0.1, OrchestratorConfig(), liveness=False)
    new, _ = plan_pass(snap, {}, 0.0, first + 0.3, OrchestratorConfig(), liveness=False)
    assert [op for op in old if op[0] == "job_run"] == [op for op in new if op[0] == "job_run"]
    await lab.ctx.propose({"op": "leader", "term": 1, "now": first + 0.1, "ops": old})
    await lab.ctx.propose({"op": "leader", "term": 2, "now": first + 0.3, "ops": new})
    svc = lab.store.snapshot().service_by_name("once")
    assert svc is not None and svc.job_status.iteration == 1
    assert len(svc.job_status.runs) == 1
    # (both batches created a task of run 1: the orchestrator keeps one)
    await step(lab, first + 0.5, term=2)
    await step(lab, first + 0.6, term=2)
    assert len(lab.live("once")) == 1
    with pytest.raises(Exception, match="older"):
        await lab.ctx.propose({"op": "leader", "term": 1, "now": first + 5.1,
                               "ops": [("job_run", svc.id, first + 5, "")]})
    assert lab.store.snapshot().services[svc.id].job_status.iteration == 1


async def test_changing_the_schedule_replaces_no_task_and_starts_no_run(
        tmp_path: Path) -> None:
    """A schedule is not part of the task template: updating it (or the policy) leaves the
    running task alone and starts no run; updating the template replaces the run's task."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(scheduled_job("ch"))
    created = lab.store.snapshot().service_by_name("ch").created_at  # type: ignore
    first = next_time(Schedule(cron=EVERY_5S), created)
    await step(lab, first + 0.1)
    (t,) = lab.live("ch")
    spec = lab.view("ch")["spec"]
    spec["mode"]["schedule"] = {"cron": "*/10 * * * * *", "policy": "allow", "history": 2}
    await lab.services.update_service("ch", spec, None)
    await step(lab, first + 0.2)
    assert [x.id for x in lab.live("ch")] == [t.id]
    assert lab.store.snapshot().service_by_name("ch").job_status.iteration == 1  # type: ignore
    spec["task"]["container"]["env"] = {"A": "1"}
    await lab.services.update_service("ch", spec, None)
    await step(lab, first + 0.3)
    await step(lab, first + 0.4)
    (n,) = lab.live("ch")
    assert n.id != t.id and n.job_iteration == 1 and n.spec.container.env == {"A": "1"}


def test_services_and_tasks_stored_before_scheduled_jobs_still_load() -> None:
    """A state written before job_status / job_iteration existed loads with their defaults."""
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "",
              "manager_secret": "", "digest": ""})
    st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": {
        "name": "a", "mode": {"type": "replicated-job"},
        "task": {"container": {"command": ["x"]}}}})
    st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": [("create", {
        "id": "t1", "service_id": "s1", "service_name": "a", "slot": 1,
        "spec": to_dict(st.services["s1"].spec.task), "service_version": 1,
        "desired_state": int(TaskState.RUNNING), "status": {"state": 0}})]})
    raw = to_dict(st)
    for svc in raw["services"].values():
        del svc["job_status"]
        del svc["spec"]["mode"]["schedule"]
    for t in raw["tasks"].values():
        del t["job_iteration"]
    back = state_from_plain(msgspec.msgpack.decode(msgspec.msgpack.encode(raw)))
    assert back.services["s1"].job_status.iteration == 0
    assert not back.services["s1"].spec.mode.scheduled
    assert back.tasks["t1"].job_iteration == 0


def test_a_run_started_skipped_and_ended_are_events() -> None:
    """Each run gives one event when it starts or is skipped and one when it ends; progress
    within a run gives none."""
    from shoal.node.events import derive

    st = ClusterState()
    st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": {
        "name": "cj", "mode": {"type": "replicated-job", "replicas": 2,
                               "schedule": {"cron": EVERY_5S}},
        "task": {"container": {"command": ["x"]}}}})

    def actions(*ops: Any) -> list[tuple[str, str]]:
        before = st.snapshot()
        cmd = {"op": "leader", "term": 1, "now": 20.0, "ops": list(ops)}
        assert "ok" in st.apply(cmd)
        return [(e.action, e.name) for e in derive(before, cmd, st.snapshot(), st.index)
                if e.type == "service"]

    assert actions(("job_run", "s1", 10.0, "")) == [("job-running", "cj")]
    assert actions(("job_run_status", "s1", 1, "running", 1, 0, "")) == []
    assert actions(("job_run", "s1", 15.0, "busy")) == [("job-skipped", "cj")]
    assert actions(("job_run", "s1", 15.0, "")) == []  # (that time is taken)
    assert actions(("job_run_status", "s1", 1, "completed", 2, 0, "2 completed")) == \
        [("job-completed", "cj")]
    runs = st.services["s1"].job_status.runs
    assert [(r.scheduled_at, r.state, r.completed) for r in runs] == \
        [(10.0, "completed", 2), (15.0, "skipped", 0)]


async def test_forbid_holds_however_many_runs_were_skipped_meanwhile(tmp_path: Path) -> None:
    """A run longer than `history` periods: the times that come meanwhile are skipped, and
    the running run stays in the history (before: the skips pushed it out, policy forbid no
    longer saw it, and a second run started beside it)."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(scheduled_job("cj", policy="forbid", history=2))
    created = lab.store.snapshot().service_by_name("cj").created_at  # type: ignore
    first = next_time(Schedule(cron=EVERY_5S), created)
    await step(lab, first + 0.1)
    (t1,) = lab.live("cj")
    for k in (1, 2, 3, 4):
        await step(lab, first + 5 * k + 0.1)
    assert [t.id for t in lab.live("cj")] == [t1.id]
    states = [r["state"] for r in runs(lab, "cj")]
    assert states == ["running", "skipped", "skipped"], states


def test_a_fixed_time_job_runs_once_on_the_night_the_clocks_go_back() -> None:
    """02:30 Paris comes twice on 2025-10-26: a job of 02:30 runs at the first (Vixie cron's
    rule for fixed times); one of every hour runs in each real hour."""
    def fired(cron: str) -> list[float]:
        s, out = Schedule(cron=cron, timezone="Europe/Paris"), []
        since, now = ts("2025-10-25 12:00:00"), ts("2025-10-25 12:00:00")
        while now < ts("2025-10-26 12:00:00"):
            due = due_time(s, since, now)
            if due:
                out.append(due)
                since = due
            now += 60
        return out

    assert fired("30 2 * * *") == [ts("2025-10-26 00:30:00")]
    hourly = fired("30 * * * *")
    assert ts("2025-10-26 00:30:00") in hourly and ts("2025-10-26 01:30:00") in hourly
    assert next_time(Schedule(cron="30 2 * * *", timezone="Europe/Paris"),
                     ts("2025-10-26 00:30:00")) == ts("2025-10-27 01:30:00")


async def test_editing_the_schedule_starts_no_run_for_times_before_the_edit(
        tmp_path: Path) -> None:
    """A yearly job changed to every 10 minutes an hour after it was made: the new
    expression's latest time before the edit is no missed run; its next time is."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    spec = scheduled_job("ed")
    spec["mode"]["schedule"]["cron"] = "0 0 1 1 *"
    await lab.services.create_service(spec)
    svc = lab.store.snapshot().service_by_name("ed")
    assert svc is not None
    edit = svc.created_at + 3600
    spec = lab.view("ed")["spec"]
    spec["mode"]["schedule"]["cron"] = "*/10 * * * *"
    await lab.ctx.propose({"op": "service_update", "id": svc.id, "spec": spec, "now": edit})
    assert [op for op in await step(lab, edit + 1) if op[0] == "job_run"] == []
    due = next_time(Schedule(cron="*/10 * * * *"), edit)
    assert [op[2] for op in await step(lab, due + 1) if op[0] == "job_run"] == [due]


@pytest.mark.parametrize(("cron", "refused"), [("R * * * *", True), ("0 R(1-5) * * *", True),
                                               ("0 0 * MAR FRI", False)])
async def test_a_random_cron_value_is_refused_by_the_api(tmp_path: Path, cron: str,
                                                         refused: bool) -> None:
    """croniter's R picks another time at every reading: leaders would disagree, a pass
    would see a different due time each time. Month and day names are not R."""
    from shoal.node.errors import BadRequest

    lab = Lab(tmp_path)
    await lab.boot(1)
    spec = scheduled_job("r")
    spec["mode"]["schedule"]["cron"] = cron
    if refused:
        with pytest.raises(BadRequest) as exc:
            await lab.services.create_service(spec)
        assert exc.value.field == "mode.schedule.cron"
    else:
        await lab.services.create_service(spec)


async def test_policy_replace_stops_the_previous_run_and_starts_the_next(
        tmp_path: Path) -> None:
    """With replace (Kubernetes' concurrencyPolicy Replace), the run due while the previous
    still runs starts, and the previous run's task is stopped; that run is recorded as
    failed, replaced, and the new one runs to its end."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(scheduled_job("rp", policy="replace"))
    created = lab.store.snapshot().service_by_name("rp").created_at  # type: ignore[union-attr]
    first = next_time(Schedule(cron=EVERY_5S), created)
    await step(lab, first + 0.1)
    (old,) = lab.live("rp")
    await step(lab, first + 5.1)  # run 2 starts; run 1's task is told to stop
    await step(lab, first + 5.2)
    (new,) = lab.live("rp")
    assert new.id != old.id and new.job_iteration == 2
    stopped = lab.store.snapshot().tasks[old.id]
    assert stopped.desired_state >= TaskState.SHUTDOWN
    first_run = runs(lab, "rp")[0]
    assert (first_run["state"], first_run["completed"]) == ("failed", 0)
    assert "replaced by a later run (policy replace)" in first_run["message"]
    lab.exit(new, 0)
    await step(lab, first + 6)
    await step(lab, first + 6.5)
    assert [r["state"] for r in runs(lab, "rp")] == ["failed", "completed"]


async def test_a_run_past_its_starting_deadline_is_skipped_not_started_late(
        tmp_path: Path) -> None:
    """A run found due later than ``starting_deadline`` after its time (no leader then) is
    recorded as skipped; within the deadline it starts late, as without one."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    spec = scheduled_job("dl")
    spec["mode"]["schedule"]["starting_deadline"] = 2.0
    await lab.services.create_service(spec)
    created = lab.store.snapshot().service_by_name("dl").created_at  # type: ignore[union-attr]
    first = next_time(Schedule(cron=EVERY_5S), created)
    await step(lab, first + 3.5)  # 3.5 s late, the deadline 2 s: skipped
    assert lab.live("dl") == []
    (skipped,) = runs(lab, "dl")
    assert skipped["state"] == "skipped" and "starting deadline (2s)" in skipped["message"]
    await step(lab, first + 6.5)  # the next time, 1.5 s late: started
    assert len(lab.live("dl")) == 1
    assert [r["state"] for r in runs(lab, "dl")] == ["skipped", "running"]


@pytest.mark.parametrize(("schedule", "field"), [
    ({"cron": EVERY_5S, "policy": "replace"}, "mode.schedule.policy"),
    ({"cron": EVERY_5S, "starting_deadline": 30.0}, "mode.schedule.starting_deadline")])
def test_replace_and_the_starting_deadline_wait_for_schema_12(schedule: dict[str, Any],
                                                              field: str) -> None:
    """A schema-11 leader would start a run beside the previous one, or late: refused
    naming the field on propose and by the state machine until the schema is 12."""
    from shoal.raft.errors import ValidationError as Refused
    from shoal.raft.schema import SECCOMP, encode_command
    from shoal.raft.state import ClusterState

    spec = {"name": "j", "mode": {"type": "replicated-job", "schedule": schedule},
            "task": {"container": {"command": ["x"]}}}
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(Refused) as exc:
        encode_command(cmd, {}, SECCOMP - 1)
    assert exc.value.field == field
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": SECCOMP - 1})
    assert st.apply(cmd)["error"]["field"] == field
    st.apply({"op": "cluster_schema", "schema": SECCOMP})
    assert "error" not in st.apply(cmd)
