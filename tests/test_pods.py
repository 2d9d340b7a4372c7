"""Pods without a network (issue 17): the spec's sidecars and init containers and their
errors naming the field, the spec file of `service create --spec`, Compose's
``x-shoal-sidecars``, and the node's pod logic (node/pod.py) over the in-memory runtime —
a sidecar restarted alone by its own policy, an init container that fails the task. The real
thing, in network namespaces: tests/test_pods_cluster.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.cli.compose import load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.cli.specflags import spec_from_create_args
from shoal.node.errors import InitFailed
from shoal.node.health import Check, HealthConfig, HealthMonitor
from shoal.node.pod import Pods, container_id, parent_of
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Health,
    HealthResult,
    Task,
    TaskState,
    status_from_dict,
    to_dict,
)
from shoal.raft.spec import SidecarSpec, TaskSpec
from shoal.raft.validate import validate_spec
from shoal.runtime.records import RunState, TaskConfig
from shoal.runtime.testing import FakeController

MAIN = {"command": ["web"]}


def spec(**task: Any) -> dict[str, Any]:
    return {"name": "web", "task": {"container": MAIN} | task}


@pytest.mark.parametrize(("task", "field", "words"), [
    ({"sidecars": [{"name": "s"}]}, "task.sidecars[0].command", "is required"),
    ({"sidecars": [{"name": "Bad", "command": ["x"]}]}, "task.sidecars[0].name",
     "container name"),
    ({"sidecars": [{"name": "main", "command": ["x"]}]}, "task.sidecars[0].name",
     "the task's own container"),
    ({"sidecars": [{"name": "s", "command": ["x"], "image": "No Image"}]},
     "task.sidecars[0].image", "invalid value"),
    ({"sidecars": [{"name": "s", "command": ["x"]}, {"name": "s", "command": ["y"]}]},
     "task.sidecars[1].name", "used twice"),
    ({"init_containers": [{"name": "s", "command": ["x"]}],
      "sidecars": [{"name": "s", "command": ["y"]}]}, "task.sidecars[0].name", "used twice"),
    ({"sidecars": [{"name": "s", "command": ["x"], "mounts": ["/data"]}]},
     "task.sidecars[0].mounts[0]", "not a target"),
    ({"container": {**MAIN, "mounts": [{"type": "tmpfs", "target": "/t"}]},
      "sidecars": [{"name": "s", "command": ["x"], "mounts": ["/t"]}]},
     "task.sidecars[0].mounts[0]", "is a tmpfs"),
    ({"sidecars": [{"name": "s", "command": ["x"], "limits": {"memory": -1}}]},
     "task.sidecars[0].limits.memory", ">= 0"),
    ({"sidecars": [{"name": "s", "command": ["x"], "restart": {"condition": "always"}}]},
     "task.sidecars[0].restart.condition", "invalid enum value"),
    ({"sidecars": [{"name": "s", "command": ["x"], "env": {"A B": "x"}}]},
     "task.sidecars[0].env", "invalid"),
    ({"sidecars": [{"name": "s", "command": ["x"], "port": 1}]}, "task.sidecars[0].port",
     "unknown field"),
    ({"init_containers": [{"name": "i", "command": ["x"], "healthcheck": {"tcp": 80}}]},
     "task.init_containers[0].healthcheck", "no health check"),
    ({"init_containers": [{"name": "i", "command": ["x"], "restart": {"delay": 3}}]},
     "task.init_containers[0].restart", "runs once"),
])
def test_a_bad_container_is_refused_naming_its_field(task: dict[str, Any], field: str,
                                                      words: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_spec(spec(**task))
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_a_pod_spec_round_trips_and_shares_only_declared_mounts() -> None:
    s = validate_spec(spec(
        container={**MAIN, "mounts": [{"type": "volume", "source": "logs",
                                        "target": "/shared"}]},
        sidecars=[{"name": "log-shipper", "command": ["ship"], "mounts": ["/shared"],
                   "healthcheck": {"tcp": 9000}, "restart": {"condition": "on-failure"}}]))
    assert s.task.sidecars[0].mounts == ("/shared",)
    again = validate_spec(json.loads(json.dumps(to_dict(s))))
    assert again == s and again.task.sidecars[0].restart.condition == "on-failure"
    assert validate_spec(spec()).task.sidecars == ()  # no pod: the task as before


def test_service_create_spec_file_with_flags_over_it_and_one_error_for_a_bad_field(
        tmp_path: Path) -> None:
    good = tmp_path / "web.yaml"
    good.write_text("name: web\nmode: {replicas: 1}\ntask:\n  container: {command: [web]}\n"
                    "  sidecars:\n    - {name: probe, command: [probe, '8000']}\n")
    args = build_parser().parse_args(["service", "create", "--spec", str(good),
                                      "--replicas", "3", "-e", "A=1"])
    out = spec_from_create_args(args)
    assert out["mode"]["replicas"] == 3 and out["task"]["container"]["env"] == {"A": "1"}
    assert out["task"]["sidecars"] == [{"name": "probe", "command": ["probe", "8000"]}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: web\ntask:\n  container: {command: [web]}\n"
                   "  sidecars:\n    - {name: probe, command: [p], limits: {cpu: many}}\n")
    with pytest.raises(CliError) as err:
        spec_from_create_args(build_parser().parse_args(
            ["service", "create", "--spec", str(bad)]))
    assert str(err.value).startswith(f"{bad}: task.sidecars[0].limits.cpu: expected"), \
        str(err.value)
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(CliError, match="a spec file is a mapping"):
        spec_from_create_args(build_parser().parse_args(
            ["service", "create", "--spec", str(tmp_path / "list.yaml")]))


def test_compose_x_shoal_sidecars_translate_to_the_pods_containers(tmp_path: Path) -> None:
    f = tmp_path / "compose.yaml"
    f.write_text("""
services:
  web:
    command: web
    volumes: [data:/data]
    x-shoal-init-containers:
      - {name: prep, command: "sh -c 'echo ok > /data/x'", volumes: ["data:/data"]}
    x-shoal-sidecars:
      - name: probe
        command: [probe]
        environment: [TARGET=http://127.0.0.1:8000]
        healthcheck: {test: ["CMD", "true"], interval: 2s}
        restart_policy: {condition: on-failure, delay: 500ms, max_attempts: 3}
        resources: {limits: {cpus: "0.25", memory: 32M}}
volumes:
  data: {}
""")
    task = load_stack("s", [f], {}).services[0].task
    (probe,) = task.sidecars
    assert probe == SidecarSpec(
        name="probe", command=("probe",), env={"TARGET": "http://127.0.0.1:8000"},
        healthcheck=probe.healthcheck, restart=probe.restart, limits=probe.limits)
    assert (probe.healthcheck.command, probe.healthcheck.interval) == ("true", 2.0)
    assert (probe.restart.condition, probe.restart.delay, probe.restart.max_attempts) == \
        ("on-failure", 0.5, 3)
    assert (probe.limits.cpu, probe.limits.memory) == (0.25, 32 << 20)
    assert task.init_containers[0].mounts == ("/data",)
    f.write_text("services:\n  web:\n    command: web\n    x-shoal-sidecars:\n"
                 "      - {name: probe, command: [p], ports: [80]}\n")
    with pytest.raises(CliError, match=r"services\.web\.x-shoal-sidecars\[0\]\.ports"):
        load_stack("s", [f], {})
    f.write_text("services:\n  web:\n    command: web\n    x-shoal-sidecars:\n"
                 "      - {name: probe, image: 'Not An Image'}\n")
    with pytest.raises(CliError, match=r"x-shoal-sidecars\[0\]\.image: invalid value"):
        load_stack("s", [f], {})


# ------------------------------------------------------------------ node/pod.py, in memory

def pod_task(**task: Any) -> Task:
    ts = validate_spec(spec(**task)).task
    assert isinstance(ts, TaskSpec)
    return Task(id="t1", service_id="s1", service_name="web", slot=1, spec=ts,
                service_version=1)


async def config_of(task: Task, c: SidecarSpec, pid: int) -> TaskConfig:
    return TaskConfig(task_id=container_id(task.id, c.name), hostname="web-1",
                      command=c.command, env=dict(c.env), join_netns=f"/proc/{pid}/ns/net")


async def settle(pods: Pods) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_sidecar_that_ends_is_restarted_alone_by_its_own_policy() -> None:
    rt = FakeController()
    pods = Pods(rt, HealthMonitor(), config_of, lambda: None)
    task = pod_task(sidecars=[
        {"name": "a", "command": ["a"], "restart": {"condition": "any", "delay": 5,
                                                   "max_attempts": 1}},
        {"name": "b", "command": ["b"], "restart": {"condition": "on-failure"}}])
    pods.start_sidecars(task, 4242)
    await settle(pods)
    assert {parent_of(t) for t in rt.tasks()} == {"t1"} and len(rt.tasks()) == 2
    assert rt.config("t1-a").join_netns == "/proc/4242/ns/net"  # the main one's netns
    rt.exit("t1-a", 137)
    rt.exit("t1-b", 0)  # on-failure: a clean exit ends it for good
    st = {c.name: c for c in pods.tend(task, 4242, now=100.0)}
    assert (st["a"].state, st["a"].restarts) == ("exited", 0)  # its delay first
    assert st["b"].state == "exited" and st["b"].message.startswith("ended")
    st = {c.name: c for c in pods.tend(task, 4242, now=105.0)}
    await settle(pods)
    assert st["a"].restarts == 1 and rt.status("t1-a").state is RunState.RUNNING
    rt.exit("t1-a", 1)
    st = {c.name: c for c in pods.tend(task, 4242, now=200.0)}
    assert st["a"].message.startswith("ended") and st["a"].restarts == 1  # max_attempts
    assert "t1" not in rt.tasks()  # (the main container is the worker's, never touched)
    reported = status_from_dict({"state": int(TaskState.RUNNING), "containers": [
        to_dict(c) for c in pods.statuses(task)]})  # (as the state machine reads a report)
    assert [(c.name, c.restarts) for c in reported.containers] == [("a", 1), ("b", 0)]
    await pods.remove("t1")
    assert rt.tasks() == {}


async def test_an_unhealthy_sidecar_is_restarted_alone_and_the_task_stays_healthy() -> None:
    """The task is starting until its checked sidecar passed once, then healthy; when the
    sidecar's check fails it is stopped and restarted by its policy (health never goes back:
    the task stays healthy, the main container untouched)."""
    failing = False

    async def prober(check: Check, pid: int) -> HealthResult:
        now = time.time()
        return HealthResult(start=now, end=now, exit_code=1 if failing else 0, output="")

    rt = FakeController()
    health = HealthMonitor(HealthConfig(tick=0), prober=prober)
    pods = Pods(rt, health, config_of, lambda: None)
    task = pod_task(sidecars=[{"name": "s", "command": ["s"], "restart": {"delay": 0},
                               "healthcheck": {"command": "check", "interval": 0.1,
                                               "retries": 1}}])
    assert pods.health_of(task, Health.NONE) is Health.STARTING
    pods.start_sidecars(task, 9)

    async def until(what: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not what():
                await asyncio.sleep(0.02)
                pods.tend(task, 9, now=time.time())
    await until(lambda: pods.health_of(task, Health.NONE) is Health.HEALTHY)
    first = rt.status("t1-s")
    failing = True
    await until(lambda: pods.statuses(task)[0].restarts == 1 and
                rt.status("t1-s") is not None and rt.status("t1-s") != first)
    assert first is not None and first.pid != rt.status("t1-s").pid
    assert pods.health_of(task, Health.NONE) is Health.HEALTHY
    health.close()


async def test_an_init_container_runs_first_and_one_that_fails_fails_the_task() -> None:
    rt = FakeController(missing_commands=frozenset({"broken"}))
    pods = Pods(rt, HealthMonitor(), config_of, lambda: None)
    ok = pod_task(init_containers=[{"name": "prep", "command": ["prep"]}])
    runner = asyncio.create_task(pods.run_inits(ok, 7))
    await settle(pods)
    assert not runner.done() and rt.config("t1-prep").join_netns == "/proc/7/ns/net"
    rt.exit("t1-prep", 0)
    await asyncio.wait_for(runner, 5)
    (prep,) = pods.statuses(ok)
    assert (prep.kind, prep.state, prep.exit_code) == ("init", "exited", 0)
    bad = pod_task(init_containers=[{"name": "prep", "command": ["broken"]}])
    with pytest.raises(InitFailed, match="init container prep failed"):
        await pods.run_inits(bad, 7)


# ------------------------------------------------------------------ the worker, in memory

async def test_the_worker_runs_a_pod_reports_its_containers_and_ends_it_with_the_task(
        tmp_path: Path) -> None:
    """Through the agent's paths (MemoryStore, leader, Worker, fake runtime): the init
    container runs before the main one's command, the sidecar after it, their states are in
    the task's status; a sidecar's exit restarts it alone; the main container's exit fails
    the task and stops the sidecar; `service rm` removes every pod, containers and all."""
    from test_control_unit import Cluster

    c = Cluster(tmp_path)
    await c.boot()
    await c.services.create_service(spec(
        init_containers=[{"name": "prep", "command": ["prep"]}],
        sidecars=[{"name": "probe", "command": ["probe"], "restart": {"delay": 0}}],
        restart={"delay": 0}))
    await c.leader.one_pass()
    await c.worker.reconcile()
    await settle(c.worker.pods)
    (tid,) = c.store.snapshot().tasks
    assert set(c.runtime.tasks()) == {f"{tid}-prep"}  # the main one waits for it
    c.runtime.exit(f"{tid}-prep", 0)
    await c.worker.wait_started()
    await settle(c.worker.pods)
    await c.worker.reconcile()
    t = c.store.snapshot().tasks[tid]
    assert t.status.state is TaskState.RUNNING
    assert [(x.name, x.kind, x.state) for x in t.status.containers] == \
        [("prep", "init", "exited"), ("probe", "sidecar", "running")]
    main_pid = t.status.pid
    assert c.runtime.config(f"{tid}-probe").join_netns == f"/proc/{main_pid}/ns/net"
    c.runtime.exit(f"{tid}-probe", 137)
    await c.worker.reconcile()  # (restarted in the background: delay 0)
    await settle(c.worker.pods)
    await c.worker.reconcile()
    t = c.store.snapshot().tasks[tid]
    probe = t.status.containers[1]
    assert (probe.state, probe.restarts, t.status.pid) == ("running", 1, main_pid)
    c.runtime.exit(tid, 2)  # the main container ends: the task fails, the pod stops
    await c.worker.reconcile()
    await settle(c.worker.pods)
    assert c.store.snapshot().tasks[tid].status.state is TaskState.FAILED
    assert c.runtime.status(f"{tid}-probe").state is RunState.EXITED
    await c.leader.one_pass()  # a replacement, whose init container runs...
    await c.worker.reconcile()
    await settle(c.worker.pods)
    (new,) = [r for r in c.runtime.tasks() if r.endswith("-prep") and not r.startswith(tid)]
    c.runtime.exit(new, 0)
    await c.worker.wait_started()
    await c.services.remove_service("web")  # every task's pod ends and is removed
    for _ in range(3):
        await c.leader.one_pass()
        await c.worker.reconcile()
        await settle(c.worker.pods)
    assert c.runtime.tasks() == {}


async def test_a_failed_init_container_fails_the_task_naming_it(tmp_path: Path) -> None:
    from test_control_unit import Cluster

    c = Cluster(tmp_path)
    c.runtime.missing_commands = frozenset({"broken"})
    await c.boot()
    await c.services.create_service(spec(
        init_containers=[{"name": "migrate", "command": ["broken"]}]))
    await c.leader.one_pass()
    await c.worker.reconcile()
    await c.worker.wait_started()
    (t,) = c.store.snapshot().tasks.values()
    assert t.status.state is TaskState.FAILED, t.status
    assert t.status.err.startswith("init container migrate failed: command not found")
    assert [(x.name, x.exit_code) for x in t.status.containers] == [("migrate", 127)]
    assert set(c.runtime.tasks()) == {f"{t.id}-migrate"}  # (kept: its logs say why)
