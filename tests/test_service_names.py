"""Service names with upper-case letters (Swarm's rule, Compose's ``webApp``): accepted once the
whole cluster reads schema 9, unique and found whatever their case — by the state machine,
the API's lookups, the mesh's DNS, `service ls -f name=`, a Compose stack. In one process, no
network or root. Each test names the property it checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import converge

from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.output import matches
from shoal.node import mesh
from shoal.node.errors import NotFound
from shoal.node.views import find_task
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState

WEB = {"name": "webApp", "task": {"container": {"command": ["sleep", "9"]}},
       "mode": {"replicas": 2}, "endpoint": {"ports": [{"published": 8080, "target": 80}]}}


def _cluster(schema: int = SCHEMA) -> ClusterState:
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": schema})
    assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="n1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER, state=NodeState.READY))})
    return st


def _create(st: ClusterState, sid: str, spec: dict[str, Any]) -> dict[str, Any]:
    return st.apply({"op": "service_create", "id": sid, "now": 1.0, "spec": spec})


def test_a_mixed_case_name_is_kept_as_given_and_unique_whatever_the_case() -> None:
    st = _cluster()
    assert "ok" in _create(st, "s1", WEB)
    assert st.services["s1"].spec.name == "webApp"
    for other in ("webapp", "WEBAPP", "WebApp"):
        res = _create(st, "s2", {**WEB, "name": other, "endpoint": {}})
        assert res["error"]["code"] == "exists" and res["error"]["field"] == "name", res
        assert "'webApp' already exists" in res["error"]["message"], res
    assert "ok" in _create(st, "s3", {**WEB, "name": "web-app", "endpoint": {}})


def test_a_cluster_still_on_schema_8_refuses_upper_case_naming_the_field() -> None:
    """A schema-8 replica compares names exactly: it could hold ``web`` and ``Web`` together,
    so the name waits for every node to read schema 9 (refused, not written half-way)."""
    st = _cluster(schema=8)
    res = _create(st, "s1", WEB)
    assert res["error"]["field"] == "name", res
    assert "schema 9" in res["error"]["message"] and "upgrade every node" in \
        res["error"]["message"], res
    assert not st.services
    assert "ok" in _create(st, "s1", {**WEB, "name": "webapp"})


@pytest.mark.parametrize("bad", ["Web_", "-web", "web.app", "w" * 64, "wéb"])
def test_names_outside_the_dns_label_rule_are_still_refused(bad: str) -> None:
    res = _create(_cluster(), "s1", {**WEB, "name": bad})
    assert res["error"]["field"] == "name", res


def test_service_task_and_dns_lookups_ignore_case() -> None:
    st = _cluster()
    assert "ok" in _create(st, "s1", WEB)
    converge(st, 2.0)
    snap = st.snapshot()
    assert snap.service_by_name("WEBAPP") is snap.services["s1"]
    assert snap.service_by_name("webapp.") is None
    task = find_task(snap, "WEBAPP.1")
    assert task.name == "webApp.1" and find_task(snap, f"webapp.2.{snap_id(snap, 2)}").slot == 2
    with pytest.raises(NotFound):
        find_task(snap, "webapp.3")
    # dns.py asks in lower case (a resolver may send any case: DNS ignores it)
    vip = snap.services["s1"].vip
    assert mesh.lookup(snap, "webapp") == [vip] == mesh.lookup(snap, "WebApp")
    assert mesh.lookup(snap, "tasks.webapp") == []  # (no task reported an address yet)


def snap_id(snap: Any, slot: int) -> str:
    return next(t.id for t in snap.tasks.values() if t.slot == slot)


def test_service_ls_name_filter_is_a_prefix_in_any_case() -> None:
    rec = {"id": "abc", "name": "webApp", "labels": {}, "mode": "replicated"}
    assert matches(rec, {"name": ["WEB"]}, "service")
    assert matches(rec, {"name": ["webapp"]}, "service")
    assert not matches(rec, {"name": ["app"]}, "service")
    task = {"id": "t1", "name": "webApp.1", "service": "webApp", "service_id": "abc"}
    assert matches(task, {"service": ["webapp"]}, "task")
    assert not matches(task, {"service": ["web"]}, "task")


def test_a_compose_service_key_with_upper_case_becomes_its_stack_service(
        tmp_path: Path) -> None:
    (tmp_path / "compose.yml").write_text(
        "services:\n  webApp:\n    image: busybox\n  db:\n    image: busybox\n"
        "    depends_on: [webApp]\n")
    stack = load_stack("demo", [tmp_path / "compose.yml"])
    assert sorted(s.name for s in stack.services) == ["demo_db", "demo_webApp"]
    (tmp_path / "bad.yml").write_text("services:\n  web.App:\n    image: busybox\n")
    with pytest.raises(ComposeError, match=r"services\.web\.App"):
        load_stack("demo", [tmp_path / "bad.yml"])


def test_a_volume_named_by_an_upper_case_service_name_is_filled_in_lower_case() -> None:
    """A volume's name is lower case: ``{{.Service.Name}}-data`` of ``dbMain`` is
    ``dbmain-data`` on the node that mounts it and in `volume ls` alike (before: the task
    failed at every start, its volume name refused)."""
    from shoal.node.volapi import implicit_volumes
    from shoal.node.worker import Worker
    from shoal.raft import templates

    st = _cluster()
    spec = {"name": "dbMain", "task": {"container": {"command": ["sleep", "9"], "mounts": [
        {"type": "volume", "source": "{{.Service.Name}}-data", "target": "/data"}]}}}
    assert "ok" in _create(st, "s1", spec)
    converge(st, 2.0)
    snap = st.snapshot()
    (task,) = snap.tasks.values()
    values = templates.task_values(task, "h1", "x86_64")
    mount = Worker._mount_spec(task.spec.container.mounts[0], snap.volumes,
                               lambda text: templates.expand(text, values, {}))
    assert mount.source == "dbmain-data"
    assert list(implicit_volumes(snap)) == ["dbmain-data"]


def test_a_stack_refuses_a_key_whose_name_differs_from_a_service_only_by_case(
        tmp_path: Path) -> None:
    """Before any write: two keys of one file (``web`` and ``Web``), or a key whose case
    changed since the last deploy (the manager would refuse the create after other services
    were already written)."""
    from shoal.cli.errors import CliError
    from shoal.cli.stack import plan_deploy

    (tmp_path / "twice.yml").write_text("services:\n  web: {image: busybox}\n"
                                        "  Web: {image: busybox}\n")
    with pytest.raises(ComposeError, match=r"services\.Web: the same name as services\.web"):
        load_stack("st", [tmp_path / "twice.yml"])
    (tmp_path / "c.yml").write_text("services:\n  webApp: {image: busybox}\n")
    stack = load_stack("st", [tmp_path / "c.yml"])
    spec = to_dict(stack.services[0])
    have = [{"id": "s1", "name": "st_webapp", "version": 1,
             "spec": {**spec, "name": "st_webapp"}}]
    objects: dict[str, list[dict[str, Any]]] = {"secret": [], "config": []}
    with pytest.raises(CliError, match="service st_webapp exists"):
        plan_deploy(stack, have, objects, prune=True)
    same = [{"id": "s1", "name": "st_webApp", "version": 1, "spec": spec}]
    assert plan_deploy(stack, same, objects, prune=True).create == []
