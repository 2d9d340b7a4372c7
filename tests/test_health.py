"""Health checks without a network (issue 12): the check a task runs, the health state
machine, the ordered merge of health reports, and what health means to the balancer, DNS and
the rolling update; then the worker with the fake runtime and a scripted prober — an unhealthy
task is stopped, reported FAILED and replaced. Each test names the property it checks."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_control_unit import Cluster
from test_mesh_plan import snap
from test_mesh_plan import task as mesh_task
from test_spec import _subparser

from shoal.cli import specflags
from shoal.cli.errors import CliError
from shoal.node.health import (
    Check,
    HealthConfig,
    HealthMonitor,
    HealthState,
    advance,
    next_delay,
    resolve,
)
from shoal.node.mesh import lookup, plan_tables
from shoal.node.rollout import rolling_update
from shoal.node.worker import Worker
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Health,
    HealthResult,
    Service,
    Task,
    TaskState,
    TaskStatus,
    UpdateStatus,
    status_from_dict,
    to_dict,
)
from shoal.raft.spec import HealthCheck
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.raft.wire import state_from_bytes, state_to_bytes
from shoal.runtime.images import ImageConfig, ImageHealthcheck


def ok(at: float) -> HealthResult:
    return HealthResult(start=at, end=at + 0.01, exit_code=0, output="ok")


def bad(at: float) -> HealthResult:
    return HealthResult(start=at, end=at + 0.01, exit_code=1, output="nope")


# ------------------------------------------------------------------ which check runs

def test_the_services_check_wins_and_zero_fields_take_the_images_then_dockers_defaults() -> None:
    image = ImageHealthcheck(test=("CMD-SHELL", "curl -f localhost"), interval=5.0,
                             retries=7)
    c = resolve(HealthCheck(http=":8080/healthz", timeout=2.0), image)
    assert c == Check(kind="http", host="127.0.0.1", port=8080, path="/healthz",
                      interval=5.0, timeout=2.0, retries=7)
    c = resolve(HealthCheck(), image)
    assert c is not None and c.argv == ("/bin/sh", "-c", "curl -f localhost")
    assert (c.interval, c.timeout, c.retries) == (5.0, 30.0, 7)
    assert resolve(HealthCheck(), ImageHealthcheck(test=("CMD", "/check", "-q"))) == \
        Check(kind="exec", argv=("/check", "-q"))
    assert resolve(HealthCheck(tcp=5432)) == Check(kind="tcp", port=5432)
    assert resolve(HealthCheck(command="test -f /ok")).argv == ("/bin/sh", "-c", "test -f /ok")


def test_no_healthcheck_and_an_image_saying_none_mean_no_check() -> None:
    image = ImageHealthcheck(test=("CMD-SHELL", "true"))
    assert resolve(HealthCheck(disable=True), image) is None
    assert resolve(HealthCheck(), ImageHealthcheck(test=("NONE",))) is None
    assert resolve(HealthCheck(), None) is None


def test_an_images_healthcheck_is_read_from_its_config_and_others_keep_their_id() -> None:
    raw = {"Cmd": ["serve"], "Healthcheck": {"Test": ["CMD-SHELL", "true"],
                                             "Interval": 2_000_000_000, "Retries": 4}}
    cfg = ImageConfig.from_json(raw)
    assert cfg.healthcheck == ImageHealthcheck(test=("CMD-SHELL", "true"), interval=2.0,
                                               retries=4)
    assert ImageConfig.from_json(cfg.to_json()) == cfg
    assert "Healthcheck" not in ImageConfig(cmd=("x",)).to_json()  # same manifest as before


# ------------------------------------------------------------------ the state machine

CHECK = Check(kind="http", port=80, interval=1.0, retries=3, start_period=10.0)


def test_one_success_makes_a_starting_task_healthy() -> None:
    s = advance(HealthState(), CHECK, ok(1.0), started_at=0.0)
    assert (s.health, s.failing_streak) == (Health.HEALTHY, 0)


def test_failures_in_the_start_period_do_not_count_later_ones_do() -> None:
    s = HealthState()
    for t in (1.0, 5.0, 9.9):
        s = advance(s, CHECK, bad(t), started_at=0.0)
    assert (s.health, s.failing_streak, len(s.log)) == (Health.STARTING, 0, 3)
    for t in (10.0, 11.0):
        s = advance(s, CHECK, bad(t), started_at=0.0)
    assert (s.health, s.failing_streak) == (Health.STARTING, 2)
    s = advance(s, CHECK, bad(12.0), started_at=0.0)
    assert (s.health, s.failing_streak) == (Health.UNHEALTHY, 3)


def test_a_healthy_task_becomes_unhealthy_after_retries_consecutive_failures_for_good() -> None:
    s = advance(HealthState(), CHECK, ok(1.0), started_at=0.0)
    s = advance(s, CHECK, bad(2.0), started_at=0.0)  # the start period no longer protects
    s = advance(s, CHECK, bad(3.0), started_at=0.0)
    assert (s.health, s.failing_streak) == (Health.HEALTHY, 2)
    s = advance(s, CHECK, ok(4.0), started_at=0.0)
    assert (s.health, s.failing_streak) == (Health.HEALTHY, 0)  # a success clears the streak
    for t in (5.0, 6.0, 7.0):
        s = advance(s, CHECK, bad(t), started_at=0.0)
    assert s.health is Health.UNHEALTHY
    s = advance(s, CHECK, ok(8.0), started_at=0.0)
    assert s.health is Health.UNHEALTHY  # it is stopped and replaced, never healthy again


def test_the_health_log_keeps_the_last_five_results() -> None:
    s = HealthState()
    for t in range(8):
        s = advance(s, CHECK, bad(float(t)), started_at=0.0)
    assert [r.start for r in s.log] == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_probes_come_faster_during_the_start_period_only() -> None:
    c = Check(kind="tcp", port=1, interval=30.0, start_period=60.0)
    assert next_delay(HealthState(), c, 0.0, 10.0, start_interval=1.0) == 1.0
    assert next_delay(HealthState(), c, 0.0, 61.0, start_interval=1.0) == 30.0
    assert next_delay(HealthState(Health.HEALTHY), c, 0.0, 10.0, 1.0) == 30.0


# ------------------------------------------------------------------ the replicated status

def _state_with_task() -> ClusterState:
    st = ClusterState()
    st.apply({"op": "node_add", "now": 1.0, "node": {
        "id": "n1", "hostname": "h1", "addr": "10.0.0.1", "api_port": 1, "raft_port": 2,
        "role": "worker"}})
    st.apply({"op": "service_create", "id": "s1", "now": 1.0,
              "spec": {"name": "web", "task": {"container": {"command": ["x"]}}}})
    t = Task(id="t1", service_id="s1", service_name="web", slot=1,
             spec=st.services["s1"].spec.task, service_version=1)
    st.apply({"op": "leader", "term": 1, "now": 1.0,
              "ops": [("create", to_dict(t)), ("assign", "t1", "n1")]})
    return st


def _report(st: ClusterState, health: Health, streak: int = 0) -> None:
    status = TaskStatus(state=TaskState.RUNNING, pid=5, addr="10.99.0.2", health=health,
                        failing_streak=streak, health_log=(bad(1.0),) if streak else ())
    st.apply({"op": "task_status", "task_id": "t1", "node_id": "n1", "now": 2.0,
              "status": to_dict(status)})


def test_health_reports_merge_forward_a_late_starting_cannot_hide_healthy() -> None:
    st = _state_with_task()
    _report(st, Health.STARTING)
    _report(st, Health.HEALTHY)
    _report(st, Health.STARTING)  # late or duplicated
    assert st.tasks["t1"].status.health is Health.HEALTHY
    _report(st, Health.HEALTHY, streak=1)  # same health, new streak and log: kept
    assert st.tasks["t1"].status.failing_streak == 1
    _report(st, Health.UNHEALTHY, streak=3)
    _report(st, Health.HEALTHY)
    assert st.tasks["t1"].status.health is Health.UNHEALTHY
    d = to_dict(st.tasks["t1"].status)
    assert status_from_dict(d) == st.tasks["t1"].status  # the msgpack form round-trips


# ------------------------------------------------------------------ who receives traffic

def _h(tid: str, health: Health, addr: str) -> Task:
    return replace(mesh_task(tid, addr=addr),
                   status=TaskStatus(state=TaskState.RUNNING, addr=addr, health=health))


def test_only_healthy_tasks_or_tasks_without_a_check_are_balanced_and_named() -> None:
    s = snap(_h("a", Health.HEALTHY, "10.99.1.2"), _h("b", Health.STARTING, "10.99.1.3"),
             _h("c", Health.UNHEALTHY, "10.99.1.4"), _h("d", Health.NONE, "10.99.1.5"))
    (table,) = plan_tables(s, {}).values()
    assert sorted(e.task_id for e in table.endpoints) == ["a", "d"]
    assert lookup(s, "tasks.web") == ["10.99.1.2", "10.99.1.5"]


# ------------------------------------------------------------------ the rolling update

def _svc(env: str, state: str = "updating") -> Service:
    spec = validate_spec({"name": "web", "mode": {"replicas": 2},
                          "task": {"container": {"command": ["x"], "env": {"V": env},
                                                 "healthcheck": {"tcp": 80}}}})
    return Service(id="s1", spec=spec, update_status=UpdateStatus(state=state, started_at=5.0))


def _t(tid: str, slot: int, svc: Service, health: Health = Health.NONE,
       state: TaskState = TaskState.RUNNING, spec_env: str | None = None) -> Task:
    spec = svc.spec.task if spec_env is None else _svc(spec_env).spec.task
    return Task(id=tid, service_id="s1", service_name="web", slot=slot, spec=spec,
                service_version=1, node_id="n1", created_at=6.0,
                status=TaskStatus(state=state, timestamp=6.0, health=health))


def test_the_rollout_waits_for_the_new_task_to_be_healthy_before_the_next_batch() -> None:
    svc = _svc("2")
    alive = lambda t: t.alive  # noqa: E731
    old = _t("old2", 2, svc, Health.HEALTHY, spec_env="1")
    starting = [_t("new1", 1, svc, Health.STARTING), old]
    assert rolling_update(svc, starting, alive, now=7.0) == []  # still in flight
    healthy = [_t("new1", 1, svc, Health.HEALTHY), old]
    assert rolling_update(svc, healthy, alive, now=7.0) == \
        [("desired", "old2", int(TaskState.SHUTDOWN))]


def test_a_replacement_that_turns_unhealthy_pauses_the_rollout() -> None:
    svc = _svc("2")
    tasks = [_t("new1", 1, svc, Health.UNHEALTHY), _t("old2", 2, svc, spec_env="1")]
    (op,) = rolling_update(svc, tasks, lambda t: t.alive, now=7.0)
    assert op[:3] == ("update_status", "s1", "paused") and "unhealthy" in op[3]


def test_an_update_completes_only_once_every_new_task_is_healthy() -> None:
    svc = _svc("2")
    tasks = [_t("new1", 1, svc, Health.HEALTHY), _t("new2", 2, svc, Health.STARTING)]
    assert rolling_update(svc, tasks, lambda t: t.alive, now=7.0) == []
    tasks[1] = _t("new2", 2, svc, Health.HEALTHY)
    assert rolling_update(svc, tasks, lambda t: t.alive, now=7.0)[0][2] == "completed"


# ------------------------------------------------------------------ flags

def _create(*argv: str) -> dict[str, Any]:
    args = _subparser("create").parse_args(["--name", "web", *argv, "--", "x"])
    return specflags.spec_from_create_args(args)


def test_health_flags_fill_the_healthcheck_struct() -> None:
    spec = _create("--health-http", ":8080/ok", "--health-interval", "1m30s",
                   "--health-timeout", "500ms", "--health-retries", "5",
                   "--health-start-period", "10s")
    assert spec["task"]["container"]["healthcheck"] == {
        "http": ":8080/ok", "interval": 90.0, "timeout": 0.5, "retries": 5,
        "start_period": 10.0}
    assert _create("--no-healthcheck")["task"]["container"]["healthcheck"] == {"disable": True}
    validate_spec(spec)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--health-interval", "soon"], "--health-interval"),
    (["--health-timeout=-1s"], "--health-timeout"),
    (["--health-retries", "many"], "--health-retries"),
    (["--health-tcp", "http"], "--health-tcp"),
])
def test_bad_health_flag_values_name_the_flag_in_the_cli(argv: list[str], flag: str) -> None:
    with pytest.raises(CliError, match=f"^{flag}"):
        _create(*argv)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--health-http", "localhost/x"], "--health-http"),
    (["--health-http", ":99999/"], "--health-http"),
    (["--health-cmd", "true", "--health-tcp", "80"], "--health-tcp"),
    (["--no-healthcheck", "--health-cmd", "true"], "--no-healthcheck"),
    (["--health-interval", "1ms"], "--health-interval"),
    (["--health-retries", "-1"], "--health-retries"),
    (["--health-tcp", "70000"], "--health-tcp"),
])
def test_health_values_the_api_refuses_name_the_flag(argv: list[str], flag: str) -> None:
    spec = {"name": "web", **_create(*argv)}
    with pytest.raises(ValidationError) as exc:
        validate_spec(spec)
    assert specflags.flag_of_field(exc.value.field) == flag, exc.value


def test_update_with_a_health_flag_turns_no_healthcheck_off() -> None:
    current = {"name": "web", "task": {"container": {"command": ["x"],
                                                     "healthcheck": {"disable": True}}}}
    parser = _subparser("update")
    args: argparse.Namespace = parser.parse_args(["--health-cmd", "true", "web"])
    spec = specflags.apply_update_args(current, args)
    assert spec["task"]["container"]["healthcheck"] == {"disable": False, "command": "true"}
    args = parser.parse_args(["--no-healthcheck", "web"])
    spec = specflags.apply_update_args(current, args)
    assert spec["task"]["container"]["healthcheck"] == {"disable": True}


# ------------------------------------------------------------------ the worker

class ScriptedProber:
    """Answers each probe with the next scripted exit code (then repeats the last)."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.calls: list[tuple[Check, int]] = []
        self.probed = asyncio.Event()

    async def __call__(self, check: Check, pid: int) -> HealthResult:
        self.calls.append((check, pid))
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        self.probed.set()
        return HealthResult(start=0.0, end=0.0, exit_code=code, output=f"code {code}")


async def _settle(c: Cluster, rounds: int = 3) -> None:
    for _ in range(rounds):
        await c.leader.one_pass()
        await c.worker.reconcile()
        await c.worker.wait_started()


async def test_worker_reports_starting_then_healthy_then_stops_an_unhealthy_task_as_failed(
        tmp_path: Path) -> None:
    """Through the agent's paths on the fake runtime: a task with a check is RUNNING and
    starting (not served), healthy after a passing probe, and after `retries` failed probes
    it is reported unhealthy, stopped, reported FAILED naming its health, and replaced."""
    c = Cluster(tmp_path)
    prober = ScriptedProber([0, 1, 1])
    c.worker.health = HealthMonitor(HealthConfig(log_refresh=0.0), prober=prober)
    c.worker.health.on_change = lambda _tid: c.worker.wakeup.set()
    await c.boot()
    await c.services.create_service({"name": "web", "task": {
        "container": {"command": ["sleep", "100"],
                      "healthcheck": {"tcp": 80, "interval": 0.1, "retries": 2}},
        "restart": {"delay": 0}}})
    await _settle(c)
    (task,) = c.store.snapshot().tasks.values()
    assert task.status.state is TaskState.RUNNING and task.status.health is Health.STARTING
    ps = await c.services.tasks("web")
    assert ps[0]["health"] == "starting"
    assert c.services.services()[0]["running"] == 0  # `service ls`: not up yet (Swarm)

    async def until(pred: Any) -> None:
        async with asyncio.timeout(5):
            while not pred():
                await asyncio.sleep(0.05)
                await c.worker.reconcile()
    await until(lambda: c.store.snapshot().tasks[task.id].status.health is Health.HEALTHY)
    assert prober.calls[0] == (Check(kind="tcp", port=80, interval=0.1, retries=2),
                               task.status.pid)
    assert c.services.services()[0]["running"] == 1
    (shown,) = c.services.service("web")["health"]  # `service inspect`
    assert shown["health"] == "healthy" and shown["log"][-1]["output"] == "code 0"
    await until(lambda: c.store.snapshot().tasks[task.id].status.state.terminal)
    ended = c.store.snapshot().tasks[task.id]
    assert ended.status.state is TaskState.FAILED
    assert "unhealthy: 2 health checks failed (last: code 1)" in ended.status.err
    assert [r.exit_code for r in ended.status.health_log] == [0, 1, 1]
    await _settle(c)
    live = [t for t in c.store.snapshot().tasks.values() if t.alive]
    assert len(live) == 1 and live[0].id != task.id  # replaced
    c.worker.close()


async def test_after_an_agent_restart_an_adopted_task_keeps_its_health_and_is_probed_again(
        tmp_path: Path) -> None:
    """A new Worker (the agent restarted; the runtime adopted the task) probes the running
    task again from its recorded health: a healthy task stays healthy (no report moves it
    back to starting) until its check fails."""
    c = Cluster(tmp_path)
    c.worker.health = HealthMonitor(HealthConfig(), prober=ScriptedProber([0]))
    await c.boot()
    await c.services.create_service({"name": "web", "task": {"container": {
        "command": ["sleep", "100"], "healthcheck": {"tcp": 80, "interval": 0.1}}}})
    await _settle(c)
    (tid,) = c.store.snapshot().tasks

    async def until(worker: Worker, pred: Any) -> None:
        async with asyncio.timeout(5):
            while not pred():
                await asyncio.sleep(0.05)
                await worker.reconcile()
    await until(c.worker, lambda: c.store.snapshot().tasks[tid].status.health is Health.HEALTHY)
    c.worker.close()

    prober = ScriptedProber([1])
    again = Worker("n1", c.store, c.runtime, asyncio.Event(),
                   health=HealthMonitor(HealthConfig(log_refresh=0.0), prober=prober))
    await again.reconcile()
    assert again.health.status(tid) == HealthState(Health.HEALTHY)
    index = c.store.index
    await again.reconcile()
    assert c.store.index == index  # nothing new to say yet
    await until(again, lambda: c.store.snapshot().tasks[tid].status.state.terminal)
    assert c.store.snapshot().tasks[tid].status.err.startswith("unhealthy: 3 health checks")
    again.close()


def test_health_survives_the_workers_state_transfer() -> None:
    """The full state a manager sends to a worker (raft/wire.py) carries the health."""
    st = _state_with_task()
    _report(st, Health.HEALTHY, streak=1)
    back = state_from_bytes(state_to_bytes(st))
    assert back.tasks["t1"].status == st.tasks["t1"].status


def test_a_schema1_cluster_refuses_a_health_check_naming_it_and_accepts_specs_without() -> None:
    """0.1 cannot express a health check: while a node still runs it, the field is refused
    (raft/schema.py, from the declarations); specs without one still downgrade."""
    from shoal.raft import schema

    plain = msgspec_builtins({"name": "web", "task": {"container": {"command": ["x"]}}})
    assert list(schema.downgrade_spec(plain)["command"]) == ["x"]
    checked = msgspec_builtins({"name": "web", "task": {"container": {
        "command": ["x"], "healthcheck": {"command": "true"}}}})
    with pytest.raises(ValidationError) as exc:
        schema.downgrade_spec(checked)
    assert exc.value.field == "task.container.healthcheck.command"


def msgspec_builtins(spec: dict[str, Any]) -> dict[str, Any]:
    import msgspec
    out: dict[str, Any] = msgspec.to_builtins(validate_spec(spec))
    return out


def test_the_update_delay_counts_from_when_the_new_task_became_healthy() -> None:
    svc = _svc("2")
    svc = replace(svc, spec=msgspec_replace_delay(svc, 10.0))
    old = _t("old2", 2, svc, Health.HEALTHY, spec_env="1")
    new = _t("new1", 1, svc, Health.HEALTHY)  # started at 6.0
    new = replace(new, status=replace(new.status, health_log=(bad(7.0), ok(20.0))))
    assert rolling_update(svc, [new, old], lambda t: t.alive, now=25.0) == []  # 20 + 10 > 25
    assert rolling_update(svc, [new, old], lambda t: t.alive, now=30.5) == \
        [("desired", "old2", int(TaskState.SHUTDOWN))]


def msgspec_replace_delay(svc: Service, delay: float) -> Any:
    import msgspec
    return msgspec.structs.replace(svc.spec, update=msgspec.structs.replace(
        svc.spec.update, delay=delay))
