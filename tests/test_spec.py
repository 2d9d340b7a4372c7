"""One declaration per spec field: validation, CLI flags, JSON Schema and docs all come from
shoal.raft.spec, and only the task template redeploys tasks."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shoal.cli import flagvalues, specflags
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.node.orchestrator import OrchestratorConfig, reconcile_services
from shoal.node.rollout import outdated
from shoal.raft.errors import ValidationError
from shoal.raft.models import Task, TaskState, TaskStatus, to_dict
from shoal.raft.spec import ServiceSpec, fields
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec

BASE: dict[str, Any] = {"name": "web", "task": {"container": {"command": ["sleep", "9"]}}}
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _subparser(verb: str) -> argparse.ArgumentParser:
    service = next(a for a in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                   if isinstance(a, argparse._SubParsersAction)).choices["service"]
    sub = next(a for a in service._subparsers._group_actions  # type: ignore[union-attr]
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]  # type: ignore[no-any-return]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_declared_flag_is_a_create_and_an_update_option() -> None:
    create, update = _options(_subparser("create")), _options(_subparser("update"))
    for f in fields():
        if not f.flag:
            continue
        assert f.flag in create, f.path
        if f.path == "name":
            assert f.flag not in update  # a service cannot be renamed
        elif f.path in specflags.PAIRED:  # (docker's `service update --cap-add`)
            assert f.flag in update and f.flag + "-add" not in update, f.path
        elif f.cli in ("list", "map"):
            assert {f.flag + "-add", f.flag + "-rm"} <= update, f.path
        else:
            assert f.flag in update, f.path


@pytest.mark.parametrize(("change", "field"), [
    ({"mode": {"replicas": -1}}, "mode.replicas"),
    ({"mode": {"replicas": "3"}}, "mode.replicas"),
    ({"task": {"container": {"command": ["x"], "env": {"A=B": "x"}}}}, "task.container.env"),
    ({"task": {"container": {"command": []}}}, "task.container.command"),
    ({"task": {"container": {"command": ["x"], "workdir": "rel"}}}, "task.container.workdir"),
    ({"task": {"container": {"command": ["x"], "mounts": [{"type": "bind", "target": "/x",
                                                          "source": "rel"}]}}},
     "task.container.mounts[0].source"),
    ({"task": {"container": {"command": ["x"]}, "resources": {"limits": {"cpu": -1}}}},
     "task.resources.limits.cpu"),
    ({"task": {"container": {"command": ["x"]}, "placement": {"constraints": ["a", "b"]}}},
     "task.placement.constraints[0]"),
    ({"endpoint": {"ports": [{"published": 7946, "target": 1}]}}, "endpoint.ports[0].published"),
    ({"update": {"parallelism": 1, "bogus": 2}}, "update.bogus"),
    ({"name": "Web_"}, "name"),
    ({"task": {"container": {"command": ["x"], "hostname": "-bad"}}},
     "task.container.hostname"),
    ({"task": {"container": {"command": ["x"]}, "network_mode": "bridge"}},
     "task.network_mode"),
    ({"task": {"container": {"command": ["x"]}, "network_mode": "host", "networks": ["b"]}},
     "task.networks"),
    ({"task": {"container": {"command": ["x"]}, "networks": ["back", "host"]}},
     "task.networks[1]"),
    ({"task": {"container": {"command": ["x"]}, "network_mode": "host"},
      "endpoint": {"ports": [{"published": 8080, "target": 80}, {"published": 81,
                                                                "target": 81}]}},
     "endpoint.ports[1].published"),
    ({"task": {"container": {"command": ["x"]}, "network_mode": "none"},
      "endpoint": {"expose": [{"port": 80}]}}, "endpoint.expose"),
    ({"task": {"container": {"command": ["x"], "cap_add": ["FLY"]}}}, "task.container.cap_add"),
    ({"task": {"container": {"command": ["x"], "cap_drop": ["ALL", "NOPE"]}}},
     "task.container.cap_drop"),
    ({"task": {"container": {"command": ["x"], "extra_hosts": ["db:10.0.0.300"]}}},
     "task.container.extra_hosts"),
    ({"task": {"container": {"command": ["x"], "extra_hosts": ["db_1:10.0.0.3"]}}},
     "task.container.extra_hosts"),
    ({"task": {"container": {"command": ["x"], "extra_hosts": ["db:fe80::1%eth0"]}}},
     "task.container.extra_hosts"),
    ({"task": {"container": {"command": ["x"], "group_add": ["9999999999"]}}},
     "task.container.group_add"),
    ({"task": {"container": {"command": ["x"], "ulimits": [
        {"name": "nofile", "soft": 4096, "hard": 1024}]}}}, "task.container.ulimits[0].soft"),
    ({"task": {"container": {"command": ["x"], "ulimits": [
        {"name": "files", "soft": 1, "hard": 1}]}}}, "task.container.ulimits[0].name"),
    ({"task": {"container": {"command": ["x"], "ulimits": [
        {"name": "nofile", "soft": 1, "hard": 1}, {"name": "nofile", "soft": 2, "hard": 2}]}}},
     "task.container.ulimits"),
    ({"task": {"container": {"command": ["x"], "sysctls": {"vm.swappiness": "10"}}}},
     "task.container.sysctls"),
    ({"task": {"container": {"command": ["x"], "sysctls": {"net.core.somaxconn": "9"}},
               "network_mode": "host"}}, "task.container.sysctls"),
])
def test_bad_values_name_the_field_by_its_path(change: dict[str, Any], field: str) -> None:
    spec = {**BASE, **change}
    with pytest.raises(ValidationError) as exc:
        validate_spec(spec)
    assert exc.value.field == field
    assert exc.value.message.startswith(field) or field in exc.value.message
    # the same check inside the state machine: recorded, never raised
    res = ClusterState().apply({"op": "service_create", "id": "s", "now": 1.0, "spec": spec})
    assert res["error"]["field"] == field


@pytest.mark.parametrize(("argv", "flag"), [
    (["--limit-memory", "12X"], "--limit-memory"),
    (["--stop-grace-period", "5q"], "--stop-grace-period"),
    (["--update-delay=-1s"], "--update-delay"),
    (["--replicas", "many"], "--replicas"),
    (["--publish", "80:x"], "--publish"),
    (["--mount", "dst=/x,color=red"], "--mount"),
    (["--constraint", "zone"], "--constraint"),
    (["--entrypoint", "sh -c 'unclosed"], "--entrypoint"),
    (["--cap-add", "FLY"], "--cap-add"),
    (["--host", "db"], "--host"),
    (["--ulimit", "nofile=many"], "--ulimit"),
    (["--ulimit", "1024"], "--ulimit"),
])
def test_bad_flag_values_name_the_flag(argv: list[str], flag: str) -> None:
    args = build_parser().parse_args(["service", "create", "--name", "w", *argv, "--", "x"])
    with pytest.raises(CliError, match=f"^{flag}"):
        specflags.spec_from_create_args(args)


def test_agent_errors_about_a_field_name_its_flag() -> None:
    assert specflags.flag_of_field("task.container.env") == "--env"
    assert specflags.flag_of_field("task.container.mounts[1].source") == "--mount"
    assert specflags.flag_of_field("endpoint.ports[0].published") == "--publish"
    assert specflags.flag_of_field("mode.replicas") == "--replicas"
    assert specflags.flag_of_field("task.force_update") == ""


def test_go_durations() -> None:
    assert flagvalues.parse_duration("1m30s", "--x") == 90.0
    assert flagvalues.parse_duration("500ms", "--x") == 0.5
    assert flagvalues.parse_duration("1h2m", "--x") == 3720.0
    assert flagvalues.parse_duration("2.5", "--x") == 2.5
    for bad in ("", "10", "s", "1x", "1s2"):
        if bad == "10":
            continue
        with pytest.raises(CliError):
            flagvalues.parse_duration(bad, "--x")


def test_create_flags_make_the_nested_spec_and_update_flags_change_it() -> None:
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "web", "--replicas", "3", "-e", "A=1",
                         "--limit-memory", "64M", "--stop-grace-period", "1m", "-p", "8080:80",
                         "--mount", "type=tmpfs,dst=/tmp", "--secret", "db,target=pw",
                         "--update-delay", "10s", "--", "sleep", "9"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    assert spec.mode.replicas == 3 and spec.task.container.env == {"A": "1"}
    assert spec.task.resources.limits.memory == 64 << 20
    assert spec.task.container.stop_grace_period == 60.0 and spec.update.delay == 10.0
    args = p.parse_args(["service", "update", "--env-add", "B=2", "--env-rm", "A",
                         "--publish-rm", "8080", "--publish-add", "9090:90/udp",
                         "--mount-rm", "/tmp", "--secret-rm", "db", "--update-parallelism",
                         "2", "--force", "web"])
    new = validate_spec(specflags.apply_update_args(to_dict(spec), args))
    assert new.task.container.env == {"B": "2"} and not new.task.container.mounts
    assert [(x.published, x.protocol) for x in new.endpoint.ports] == [(9090, "udp")]
    assert not new.task.container.secrets and new.update.parallelism == 2
    assert new.task.force_update == 1 and new.mode.replicas == 3


def test_security_and_kernel_flags_as_dockers_on_create_and_update() -> None:
    """--read-only, --cap-add/--cap-drop (on update too: one moves a capability out of the
    other list, as docker's), --host, --ulimit, --sysctl; --read-only=false turns it off."""
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "web", "--read-only", "--cap-add",
                         "net_admin", "--cap-drop", "ALL", "--host", "db:10.0.0.2", "--host",
                         "v6=::1", "--ulimit", "nofile=1024:2048", "--ulimit", "nproc=-1",
                         "--sysctl", "net.core.somaxconn=1024", "--group-add", "staff",
                         "--group-add", "4242", "--", "sleep", "9"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    c = spec.task.container
    assert c.read_only and c.cap_add == ("NET_ADMIN",) and c.cap_drop == ("ALL",)
    assert c.extra_hosts == ("db:10.0.0.2", "v6:::1")
    assert [(u.name, u.soft, u.hard) for u in c.ulimits] == [("nofile", 1024, 2048),
                                                            ("nproc", -1, -1)]
    assert c.sysctls == {"net.core.somaxconn": "1024"} and c.group_add == ("staff", "4242")
    args = p.parse_args(["service", "update", "--read-only=false", "--cap-drop", "NET_ADMIN",
                         "--cap-add", "chown", "--host-rm", "db", "--host-add", "api:10.0.0.4",
                         "--ulimit-rm", "nproc", "--ulimit-add", "nofile=10",
                         "--sysctl-rm", "net.core.somaxconn", "--sysctl-add",
                         "kernel.shmmax=1000000", "--group-rm", "staff", "--group-add",
                         "wheel", "web"])
    new = validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container
    assert not new.read_only and new.cap_add == ("CHOWN",)
    assert new.cap_drop == ("ALL", "NET_ADMIN")
    assert new.extra_hosts == ("v6:::1", "api:10.0.0.4")
    assert [(u.name, u.soft, u.hard) for u in new.ulimits] == [("nofile", 10, 10)]
    assert new.sysctls == {"kernel.shmmax": "1000000"} and new.group_add == ("4242", "wheel")
    # docker's updateCapabilities: adding wins over dropping the same; RESET empties a list;
    # updateHosts: --host-rm NAME:IP removes that line only, NAME every line of it; an added
    # line goes last, an exact duplicate once
    args = p.parse_args(["service", "update", "--cap-add", "SYS_NICE", "--cap-drop",
                         "SYS_NICE", "--cap-drop", "RESET", "--cap-drop", "MKNOD",
                         "--host-rm", "v6:10.9.9.9", "--host-add", "v6:10.0.0.9",
                         "--host-add", "v6:::1", "web"])
    again = validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container
    assert again.cap_add == ("NET_ADMIN", "SYS_NICE") and again.cap_drop == ("MKNOD",)
    assert again.extra_hosts == ("db:10.0.0.2", "v6:::1", "v6:10.0.0.9")
    args = p.parse_args(["service", "update", "--host-rm", "v6", "--host-rm", "db:10.0.0.2",
                         "web"])
    assert validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container \
        .extra_hosts == ()
    args = p.parse_args(["service", "update", "--read-only=False", "web"])
    assert not validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container \
        .read_only
    args = p.parse_args(["service", "update", "--read-only=true", "web"])
    assert validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container \
        .read_only
    args = p.parse_args(["service", "update", "--replicas", "2", "web"])  # (left as it is)
    assert validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container \
        .read_only
    # docker's --init: what every task has anyway (tini as PID 1)
    args = p.parse_args(["service", "create", "--init", "--name", "x", "--", "sleep", "9"])
    assert validate_spec(specflags.spec_from_create_args(args)).name == "x"
    # the global -H/--host before the command, the service's --host after it
    args = p.parse_args(["--host", "unix:///x.sock", "service", "create", "--host",
                         "db:10.0.0.2", "--", "x"])
    assert args.host == "unix:///x.sock"
    assert specflags.spec_from_create_args(args)["task"]["container"]["extra_hosts"] == \
        ["db:10.0.0.2"]


def test_network_host_and_none_are_network_modes_as_dockers_network_flag_says() -> None:
    """`--network host` (Docker's spelling) is stored as network mode host; `--network-mode`
    says it directly; an update back to the cluster network is `--network-mode default`."""
    p = build_parser()
    for argv, mode in ((["--network", "host", "-p", "8080:80"], "host"),
                       (["--network-mode", "none"], "none"), ([], "default")):
        args = p.parse_args(["service", "create", "--name", "web", *argv, "--", "sleep", "9"])
        spec = validate_spec(specflags.spec_from_create_args(args))
        assert spec.task.network_mode == mode and spec.task.networks == ()
    assert to_dict(spec)["task"]["network_mode"] == "default"
    host = validate_spec(specflags.spec_from_create_args(p.parse_args(
        ["service", "create", "--name", "web", "--network", "host", "--", "x"])))
    args = p.parse_args(["service", "update", "--network-mode", "default", "web"])
    assert validate_spec(specflags.apply_update_args(to_dict(host), args)).task.network_mode \
        == "default"
    with pytest.raises(ValidationError) as exc:
        validate_spec(specflags.apply_update_args(to_dict(host), p.parse_args(
            ["service", "update", "--network-add", "back", "web"])))
    assert exc.value.field == "task.networks"


def test_host_network_ports_are_nobody_elses_listeners() -> None:
    """A port that tasks on the host's network bind on their node is refused as a routing-mesh
    listener (a published port, or a port a VIP serves) of any service — the host one's own
    included, whichever service comes first — and a port the managers assign skips it; the
    new task of a start-first update could not bind it beside the old one."""
    def host(name: str, *ports: dict[str, Any], **endpoint: Any) -> dict[str, Any]:
        return {"name": name, "task": {"container": {"command": ["x"]}, "network_mode": "host"},
                "endpoint": {"ports": list(ports), **endpoint}}

    def create(st: ClusterState, sid: str, spec: dict[str, Any]) -> dict[str, Any]:
        res: dict[str, Any] = st.apply({"op": "service_create", "id": sid, "now": 1.0,
                                        "spec": spec})
        return res
    from shoal.raft.schema import SCHEMA
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": SCHEMA})
    api = {"name": "api", "task": {"container": {"command": ["x"]}},
           "endpoint": {"expose": [{"port": 80}], "ports": [{"published": 8443,
                                                               "target": 443}]}}
    assert create(st, "api", api)["ok"]
    for spec in (host("edge", {"published": 8080, "target": 80}),
                 host("edge", expose=[{"port": 8443}])):
        res = create(st, "edge", spec)
        assert res["error"]["field"] == "task.network_mode", res
        assert "service api has a routing-mesh listener" in res["error"]["message"]
    assert create(st, "edge", host("edge", {"published": 8081, "target": 81}))["ok"]
    res = create(st, "web", {**api, "name": "web", "endpoint": {"expose": [{"port": 81}]}})
    assert res["error"]["field"] == "task.network_mode" and "service edge" in \
        res["error"]["message"]
    with pytest.raises(ValidationError) as exc:  # its own published port on its target
        validate_spec(host("x", {"published": 8081, "target": 81},
                           {"published": 81, "target": 82}))
    assert exc.value.field == "endpoint.ports[1].published"
    assert create(st, "auto", host("auto", {"published": 0, "target": 30000}))["ok"]
    assert [p.published for p in st.services["auto"].spec.endpoint.ports] == [30001]
    with pytest.raises(ValidationError) as exc:
        validate_spec({**host("x"), "update": {"order": "start-first"}})
    assert exc.value.field == "update.order"


def test_host_network_tasks_that_serve_ports_are_placed_one_per_node() -> None:
    """Two tasks of such a service on one node could not both bind its ports: at most one
    per node (stored as max_replicas 1, so `service ps` says why a third of 3 replicas on 2
    nodes waits); more than one per node is refused; without ports, or global, no limit."""
    def spec(**extra: Any) -> ServiceSpec:
        task = {"container": {"command": ["x"]}, "network_mode": "host",
                **extra.pop("task", {})}
        return validate_spec({"name": "edge", "task": task, "mode": {"replicas": 3}, **extra})
    served = {"endpoint": {"ports": [{"published": 8080, "target": 80}]}}
    assert spec(**served).task.placement.max_replicas == 1
    assert spec(endpoint={"expose": [{"port": 9100}]}).task.placement.max_replicas == 1
    assert spec().task.placement.max_replicas == 0
    assert spec(**served, mode={"type": "global"}).task.placement.max_replicas == 0
    with pytest.raises(ValidationError) as exc:
        spec(**served, task={"placement": {"max_replicas": 2}})
    assert exc.value.field == "task.placement.max_replicas"
    st = _cluster(BASE)  # one node: the second and third replica wait, saying why
    st.apply({"op": "cluster_schema", "schema": 4})
    res = st.apply({"op": "service_create", "id": "s2", "now": 1.0,
                    "spec": to_dict(spec(**served))})
    assert "ok" in res, res
    ops, _ = reconcile_services(st.snapshot(), 2.0, iter(f"h{i}" for i in range(9)).__next__,
                                OrchestratorConfig())
    st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": ops})
    from shoal.node.scheduler import schedule
    pending = [t for t in st.tasks.values() if t.service_id == "s2" and not t.node_id]
    plan = schedule(st.snapshot(), pending)
    assert len(plan.assignments) == 1 and len(plan.unschedulable) == 2
    assert all("max replicas" in why for _, why in plan.unschedulable), plan.unschedulable


def test_create_takes_dockers_image_command_shape_and_a_name_is_optional() -> None:
    """`service create [--name N] IMAGE [COMMAND [ARG...]]` as Docker's: the first word is
    the image; `-- CMD` is a command on the host's filesystem (shoal's form); with `--image`
    the words are its command; without --name a name is made from the image's base name."""
    p = build_parser()

    def spec(*argv: str) -> dict[str, Any]:
        return specflags.spec_from_create_args(p.parse_args(["service", "create", *argv]))

    s = spec("--name", "w", "reg:5000/team/app:1.2", "sh", "-c", "echo hi")
    assert s["task"]["container"] == {"image": "reg:5000/team/app:1.2",
                                      "command": ["sh", "-c", "echo hi"]}
    assert "command" not in spec("nginx:alpine")["task"]["container"]
    host = spec("--name", "w", "--", "sleep", "9")["task"]["container"]
    assert host == {"command": ["sleep", "9"]}
    assert spec("--name", "w", "--image", "busybox:1", "sleep", "9")["task"]["container"] == \
        {"image": "busybox:1", "command": ["sleep", "9"]}
    named = spec("registry.example:5000/team/web-app:2@sha256:" + "a" * 64)["name"]
    assert re.fullmatch(r"web-app-[0-9a-f]{5}", named), named
    assert validate_spec(spec("nginx:alpine")).name.startswith("nginx-")
    with pytest.raises(CliError, match="needs a command or an image"):
        spec("--name", "a")


def test_the_json_schema_comes_from_the_declarations() -> None:
    (_schema,), components = msgspec.json.schema_components([ServiceSpec])
    limits = components["Limits"]["properties"]["memory"]
    decl = next(f for f in fields() if f.path == "task.resources.limits.memory")
    assert limits["description"] == decl.help and limits["minimum"] == 0
    assert components["ServiceSpec"]["required"] == ["name"]


def test_docs_api_md_spec_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen", DOCS / "gen_spec_reference.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (DOCS / "api.md").read_text()
    assert gen.render(text) == text, "docs/api.md is out of date: run `make docs`"
    for f in fields():
        assert f"`{f.path}`" in text


# ------------------------------------------------------------------ what redeploys
def _cluster(spec: dict[str, Any]) -> ClusterState:
    st = ClusterState()
    st.apply({"op": "node_add", "now": 1.0, "node": {
        "id": "n1", "hostname": "h1", "addr": "10.0.0.1", "api_port": 2377, "raft_port": 2378,
        "role": "manager"}})
    assert "ok" in st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})
    return st


def _converge(st: ClusterState, now: float) -> None:
    ids = iter(f"t{i}" for i in range(10_000))
    for _ in range(4):
        ops, _ = reconcile_services(st.snapshot(), now, lambda: next(ids) + str(now),
                                    OrchestratorConfig())
        if ops:
            st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
        for t in list(st.tasks.values()):
            if not t.node_id and t.alive:
                st.apply({"op": "leader", "term": 1, "now": now, "ops": [("assign", t.id, "n1")]})
        for t in list(st.tasks.values()):
            want = TaskState.RUNNING if t.desired_state <= TaskState.RUNNING else \
                TaskState.SHUTDOWN
            if t.node_id and t.status.state < want:
                st.apply({"op": "task_status", "task_id": t.id, "node_id": "n1", "now": now,
                          "status": to_dict(TaskStatus(state=want, timestamp=now))})


@pytest.mark.parametrize("change", [
    {"mode": {"replicas": 3}, "update": {"parallelism": 3, "delay": 5.0}},
    {"mode": {"replicas": 3}, "rollback": {"parallelism": 2}},
    {"mode": {"replicas": 3}, "endpoint": {"lb_algorithm": "least-conn",
                                           "ports": [{"published": 80, "target": 8}]}},
    {"mode": {"replicas": 3}, "labels": {"team": "a"}},
    {"mode": {"replicas": 3}, "task": {"container": {"command": ["sleep", "9"]},
                                       "restart": {"delay": 9.0, "max_attempts": 4}}},
])
def test_changes_outside_the_task_template_replace_no_task(change: dict[str, Any]) -> None:
    st = _cluster({**BASE, "mode": {"replicas": 3}})
    _converge(st, 2.0)
    before = set(st.tasks)
    assert len(before) == 3
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 3.0,
                             "spec": {**BASE, **change}})
    _converge(st, 4.0)
    assert set(st.tasks) == before


def test_a_template_change_replaces_tasks_one_at_a_time() -> None:
    st = _cluster({**BASE, "mode": {"replicas": 3}})
    _converge(st, 2.0)
    old = set(st.tasks)
    new_spec = {**BASE, "mode": {"replicas": 3},
                "task": {"container": {"command": ["sleep", "9"], "env": {"V": "2"}}}}
    st.apply({"op": "service_update", "id": "s1", "now": 3.0, "spec": new_spec})
    now = 4.0
    while {t.id for t in st.tasks.values() if t.alive} & old:
        ops, _ = reconcile_services(st.snapshot(), now, lambda n=now: f"n{n}",
                                    OrchestratorConfig())
        stopping = [op for op in ops if op[0] == "desired"]
        assert len(stopping) <= 1  # parallelism 1
        _converge(st, now)
        now += 1.0
        assert now < 30
    svc = st.services["s1"]
    assert all(t.spec == svc.spec.task for t in st.tasks.values() if t.alive)
    _converge(st, now)
    assert st.services["s1"].update_status.state == "updating"  # (within the monitor window)
    _converge(st, now + 5.0)  # the default monitor: 5 s after the last task came up
    assert st.services["s1"].update_status.state == "completed"


def test_outdated_compares_only_the_template() -> None:
    spec = validate_spec({**BASE, "mode": {"replicas": 2}})
    task = Task(id="t", service_id="s", service_name="web", slot=1, spec=spec.task,
                service_version=1)
    changed = msgspec.structs.replace(spec, update=msgspec.structs.replace(spec.update,
                                                                           parallelism=4))
    assert not outdated(task, changed.task)
    env = validate_spec({**BASE, "task": {"container": {"command": ["sleep", "9"],
                                                        "env": {"A": "b"}}}})
    assert outdated(task, env.task)


def test_an_error_quotes_the_bad_value_verbatim_and_short() -> None:
    """The value in "got VALUE" is user input, not a regex template (a backslash in it once
    crashed validation with a 500: found by tests/test_api_fuzz.py), and a long value is cut."""
    with pytest.raises(ValidationError) as info:
        validate_spec({"name": "w", "task": {"resources": {"reservations": "\\u\\1 x"}}})
    assert info.value.field == "task.resources.reservations"
    assert "got '\\\\u\\\\1 x'" in info.value.message
    with pytest.raises(ValidationError) as info:
        validate_spec({"name": "w", "task": {"resources": {"limits": "y" * 1000}}})
    assert len(info.value.message) < 200 and info.value.message.endswith("...")


def test_entrypoint_is_split_as_a_shell_would_and_empty_means_the_images() -> None:
    """`--entrypoint 'sh -c'` (Docker's: one string, split as a shell would) replaces the
    image's ENTRYPOINT; `--entrypoint ''` on update gives the image's back."""
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "w", "--entrypoint",
                         "/bin/sh -c", "busybox:1", "echo 'a b'"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    assert spec.task.container.entrypoint == ("/bin/sh", "-c")
    assert spec.task.container.command == ("echo 'a b'",)
    new = specflags.apply_update_args(to_dict(spec), p.parse_args(
        ["service", "update", "--entrypoint", "", "w"]))
    assert validate_spec(new).task.container.entrypoint == ()
    with pytest.raises(ValidationError) as exc:
        validate_spec({"name": "w", "task": {"container": {"image": "x",
                                                            "entrypoint": ["", "a"]}}})
    assert exc.value.field == "task.container.entrypoint"
    # without an image the entrypoint alone is a program to run
    assert validate_spec({"name": "w", "task": {"container": {"entrypoint": ["sleep", "1"]}}})


def test_env_without_a_value_takes_it_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker's `-e VAR`: VAR's value in the client's environment, left out when unset."""
    monkeypatch.setenv("SHOAL_TEST_TOKEN", "s3t")
    monkeypatch.delenv("SHOAL_TEST_UNSET", raising=False)
    args = build_parser().parse_args(["service", "create", "--name", "w", "-e",
                                      "SHOAL_TEST_TOKEN", "-e", "SHOAL_TEST_UNSET", "-e",
                                      "A=1", "--", "x"])
    env = validate_spec(specflags.spec_from_create_args(args)).task.container.env
    assert env == {"SHOAL_TEST_TOKEN": "s3t", "A": "1"}
    with pytest.raises(CliError, match=r"^--env expects KEY=VALUE"):
        specflags.spec_from_create_args(build_parser().parse_args(
            ["service", "create", "--name", "w", "-e", "=x", "--", "x"]))


def test_a_check_run_without_a_shell_and_the_check_kinds_replace_each_other() -> None:
    """`healthcheck.exec` (Compose's ["CMD", ...]) runs its argv as is — for images without
    /bin/sh — and is the main container's only; on update, --health-cmd/-http/-tcp replace
    whatever check the spec had (docker's --health-cmd replaces the test)."""
    from shoal.node.health import resolve

    spec = validate_spec({"name": "w", "task": {"container": {
        "image": "distroless:1", "healthcheck": {"exec": ["/app/check", "--quick"]}}}})
    check = resolve(spec.task.container.healthcheck)
    assert check is not None and check.argv == ("/app/check", "--quick")
    with pytest.raises(ValidationError) as exc:
        validate_spec({"name": "w", "task": {"container": {"command": ["x"]}, "sidecars": [
            {"name": "s", "command": ["y"], "healthcheck": {"exec": ["z"]}}]}})
    assert exc.value.field == "task.sidecars[0].healthcheck.exec"
    with pytest.raises(ValidationError):
        validate_spec({"name": "w", "task": {"container": {"command": ["x"], "healthcheck": {
            "exec": ["a"], "command": "b"}}}})
    new = specflags.apply_update_args(to_dict(spec), build_parser().parse_args(
        ["service", "update", "--health-http", ":80/", "w"]))
    h = validate_spec(new).task.container.healthcheck
    assert (h.exec, h.http) == ((), ":80/")
    new = specflags.apply_update_args(new, build_parser().parse_args(
        ["service", "update", "--health-cmd", "true", "w"]))
    h = validate_spec(new).task.container.healthcheck
    assert (h.http, h.command) == ("", "true")
