"""Secrets and configs at any path, owned by uid:gid (Docker's ``target``, ``uid``, ``gid``;
schema 11), without a network or root: the spec's rules (each error names its field), the
place and owner each reference gives its file, Docker's defaults as the managers write them
(a new config at /NAME; a running service's file never moves), the schema gate (refused
naming the item below 11; older nodes are sent no key they do not know), the runtime's plan
(the file staged owned by uid:gid, bound inside the root without noexec), and the CLI's and
Compose's forms.

Each test names the property it checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import msgpack
import msgspec
import pytest
from test_compose import deploy, svc
from test_control_unit import Cluster
from test_spec import _subparser

from shoal.cli import pretty, specflags
from shoal.cli.errors import CliError
from shoal.cli.flagvalues import parse_file_ref
from shoal.node.control.services import file_defaults
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.raft.errors import ValidationError
from shoal.raft.models import Task, to_dict
from shoal.raft.schema import SCHEMA, encode_command
from shoal.raft.spec import FILE_TARGETS, FileRef, docker_file_defaults
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.raft.wire import state_from_bytes, state_to_bytes
from shoal.runtime.launcher import MS_NODEV, MS_NOSUID, MS_RDONLY, Spec
from shoal.runtime.records import TaskConfig
from shoal.runtime.rootfs import MountSpec, RootfsPlan, User, build_plan


def _spec(**container: Any) -> dict[str, Any]:
    return {"name": "app", "task": {"container": {"command": ["serve"], **container}}}


def _state(schema: int) -> ClusterState:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": schema})
    for kind in ("secret", "config"):
        for name in ("site", "db", "run"):
            st.apply({"op": f"{kind}_create", "id": f"{kind[0]}{name}", "name": name,
                      "data": b"x", "labels": {}, "now": 1.0})
    return st


# ------------------------------------------------------------------------- the spec's rules

@pytest.mark.parametrize(("container", "field", "words"), [
    ({"configs": [{"name": "site", "target": "/etc/../shadow"}]},
     "task.container.configs[0].target", "'..'"),
    ({"configs": [{"name": "site", "target": "conf/site.conf"}]},
     "task.container.configs[0].target", "absolute path or a file name"),
    ({"secrets": [{"name": "db", "target": "/proc/self/environ"}]},
     "task.container.secrets[0].target", "/proc"),
    ({"secrets": [{"name": "db", "target": "/sys/x"}]}, "task.container.secrets[0].target",
     "/sys"),
    ({"configs": [{"name": "site", "target": "/dev/null"}]},
     "task.container.configs[0].target", "/dev"),
    ({"configs": [{"name": "site", "target": "/"}]}, "task.container.configs[0].target",
     "cannot be /"),
    ({"configs": [{"name": "site", "uid": "web"}]}, "task.container.configs[0].uid",
     "a number"),
    ({"secrets": [{"name": "db", "gid": "-1"}]}, "task.container.secrets[0].gid", "a number"),
    ({"secrets": [{"name": "db", "uid": 101}]}, "task.container.secrets[0].uid", "str"),
    ({"configs": [{"name": "site", "target": "/etc/a.conf"},
                  {"name": "db", "target": "/etc//a.conf"}]},
     "task.container.configs[1].target", "configs[0]"),
    ({"secrets": [{"name": "db", "target": "/run/secrets/x"}],
      "configs": [{"name": "site", "target": "/run/secrets/x"}]},
     "task.container.configs[0].target", "secrets[0]"),
    ({"secrets": [{"name": "db", "target": "x"}],
      "configs": [{"name": "site", "target": "/run/secrets/x"}]},
     "task.container.configs[0].target", "secrets[0]"),
    ({"configs": [{"name": "site", "target": "/data"}],
      "mounts": [{"type": "tmpfs", "target": "/data"}]},
     "task.container.configs[0].target", "mounts[0]"),
    ({"configs": [{"name": "site", "target": "/data"}],
      "mounts": [{"type": "tmpfs", "target": "/data/cache"}]},
     "task.container.configs[0].target", "above"),
])
def test_a_target_is_a_file_name_or_a_clean_absolute_path_and_each_error_names_its_field(
        container: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_spec(_spec(**container))
    assert exc.value.field == field, exc.value
    assert words in exc.value.message, exc.value.message


def test_an_absolute_target_is_normalised_and_the_spec_round_trips_with_its_owner() -> None:
    spec = validate_spec(_spec(
        configs=[{"name": "site", "target": "/etc//nginx/./nginx.conf", "uid": "101",
                  "gid": "101", "mode": 0o440}],
        secrets=[{"name": "db", "target": "/etc/app/db.pass", "uid": "0", "gid": "0"}],
        mounts=[{"type": "tmpfs", "target": "/etc/nginx/conf.d"}]))
    c = spec.task.container
    assert (c.configs[0].target, c.configs[0].uid, c.configs[0].gid, c.configs[0].mode) == \
        ("/etc/nginx/nginx.conf", "101", "101", 0o440)
    assert validate_spec(to_dict(spec)) == spec
    assert to_dict(spec)["task"]["container"]["configs"][0] == {
        "name": "site", "target": "/etc/nginx/nginx.conf", "uid": "101", "gid": "101",
        "mode": 0o440}
    st = _state(SCHEMA)
    assert st.apply({"op": "service_create", "id": "s1", "now": 2.0,
                     "spec": to_dict(spec)})["ok"]
    back = state_from_bytes(state_to_bytes(st))
    assert back.services["s1"].spec == spec


def test_each_reference_names_its_files_place() -> None:
    """A secret's file name is in /run/secrets (old and new, as Docker's); a config's file
    name is where specs before schema 11 put it, /run/configs; an absolute target is it."""
    assert FileRef(name="db").file_path("secret") == "/run/secrets/db"
    assert FileRef(name="db", target="pw").file_path("secret") == "/run/secrets/pw"
    assert FileRef(name="site").file_path("config") == "/run/configs/site"
    assert FileRef(name="site", target="/site").file_path("config") == "/site"
    assert FileRef(name="db", target="/etc/db").file_path("secret") == "/etc/db"


# ------------------------------------------------------------ Docker's defaults, written once

def _refs(*refs: dict[str, Any]) -> tuple[FileRef, ...]:
    return tuple(msgspec.convert(r, FileRef) for r in refs)


def _shown(refs: tuple[FileRef, ...]) -> list[tuple[str, str, str, str]]:
    return [(r.name, r.target, r.uid, r.gid) for r in refs]


def test_a_new_reference_gets_dockers_place_and_owner_written_into_the_spec() -> None:
    """Docker: a config's relative target is /TARGET (containerConfigMountPath "/"), the
    CLI's and Compose's uid and gid 0; a secret's stays in /run/secrets."""
    got = docker_file_defaults(_refs({"name": "site"}, {"name": "app", "target": "app.conf"},
                                     {"name": "tls", "target": "/etc/tls.pem", "uid": "101"}),
                               "config", (), SCHEMA)
    assert _shown(got) == [("site", "/site", "0", "0"), ("app", "/app.conf", "0", "0"),
                           ("tls", "/etc/tls.pem", "101", "0")]
    got = docker_file_defaults(_refs({"name": "db"}), "secret", (), SCHEMA)
    assert _shown(got) == [("db", "", "0", "0")]


def test_a_running_services_files_keep_their_place_and_owner_through_updates() -> None:
    """A reference written before schema 11 (a config file name: /run/configs/NAME, owned by
    the task's user): an update that passes it back, a rotation to a new object at the same
    file name, or the same place written otherwise, leaves it where and whose it was."""
    old = _refs({"name": "site", "target": "site"}, {"name": "tls"})
    again = docker_file_defaults(old, "config", old, SCHEMA)
    assert again == old  # (nothing to redeploy)
    rotated = docker_file_defaults(_refs({"name": "site-v2", "target": "site"}), "config",
                                   old, SCHEMA)
    assert _shown(rotated) == [("site-v2", "site", "", "")]
    assert rotated[0].file_path("config") == "/run/configs/site"
    spelled = docker_file_defaults(_refs({"name": "site", "target": "/run/configs/site"}),
                                   "config", old, SCHEMA)
    assert _shown(spelled) == [("site", "site", "", "")]
    # the rotation of a reference written without a target: the new name, the old place
    rotated = docker_file_defaults(_refs({"name": "tls-v2", "target": "tls"}), "config",
                                   old, SCHEMA)
    assert _shown(rotated) == [("tls-v2", "tls", "", "")]
    assert rotated[0].file_path("config") == "/run/configs/tls"
    # a new reference beside them gets Docker's place and owner
    more = docker_file_defaults(old + _refs({"name": "extra"}), "config", old, SCHEMA)
    assert _shown(more)[2:] == [("extra", "/extra", "0", "0")]
    # an owner given is taken, even at an old place
    owned = docker_file_defaults(_refs({"name": "site", "target": "site", "uid": "101"}),
                                 "config", old, SCHEMA)
    assert _shown(owned) == [("site", "site", "101", "0")]


def test_below_schema_11_a_target_older_nodes_can_write_is_written_their_way() -> None:
    for kind, base in (("secret", "/run/secrets"), ("config", "/run/configs")):
        got = docker_file_defaults(_refs({"name": "x", "target": f"{base}/x.conf"},
                                         {"name": "y"}), kind, (), FILE_TARGETS - 1)
        assert _shown(got) == [("x", "x.conf", "", ""), ("y", "", "", "")]
    # the rest is left for the gate to refuse by name
    got = docker_file_defaults(_refs({"name": "x", "target": "/etc/x.conf"}), "config", (),
                               FILE_TARGETS - 1)
    assert _shown(got) == [("x", "/etc/x.conf", "", "")]


async def test_the_api_writes_the_defaults_and_a_task_sees_each_file_where_its_spec_says(
        tmp_path: Path) -> None:
    """Through the manager's service create/update and the node's file resolution: a
    service of a schema-10 manager (config file name, no owner) keeps /run/configs/NAME owned
    by the task's user across an update; a new service's config is /NAME owned by 0:0."""
    c = Cluster(tmp_path)
    await c.boot()
    for name in ("site", "app"):
        await c.ctx.propose({"op": "config_create", "id": f"c{name}", "name": name,
                             "data": name.encode(), "labels": {}, "now": 1.0})
    # as a manager of schema 10 wrote it (the API's defaults did not exist)
    await c.ctx.propose({"op": "service_create", "id": "old1", "now": 1.0, "spec": _spec(
        configs=[{"name": "site"}])})
    await c.services.create_service({**_spec(configs=[
        {"name": "site"}, {"name": "app", "target": "/etc/app/app.conf", "uid": "101",
                           "gid": "101", "mode": 0o440}]), "name": "new"})
    snap = c.store.snapshot()
    new = snap.service_by_name("new")
    assert new is not None
    assert _shown(new.spec.task.container.configs) == [
        ("site", "/site", "0", "0"), ("app", "/etc/app/app.conf", "101", "101")]
    old = snap.services["old1"]
    await c.services.update_service("old1", to_dict(msgspec.structs.replace(
        old.spec, labels={"v": "2"})), None)
    old = c.store.snapshot().services["old1"]
    assert _shown(old.spec.task.container.configs) == [("site", "", "", "")]
    assert old.version == 2

    secrets = SecretsApi(c.ctx, Security(c.ctx))
    files = {}
    for s in (old, new):
        task = Task(id=f"t{s.id}", service_id=s.id, service_name=s.spec.name, slot=1,
                    spec=s.spec.task, service_version=s.version)
        files[s.id] = await secrets.resolve_task_files(task)
    assert files["old1"] == {"/run/configs/site": (b"site", 0o444)}  # (the task's user)
    assert files[new.id] == {"/site": (b"site", 0o444, 0, 0),
                             "/etc/app/app.conf": (b"app", 0o440, 101, 101)}


def test_the_spec_check_runs_again_on_the_written_defaults() -> None:
    """A new config file name and another reference's absolute path that turn out the same
    once Docker's place is written: refused naming the field, not half-written."""
    spec = validate_spec(_spec(configs=[{"name": "site", "target": "/site"},
                                        {"name": "db", "target": "site"}]))
    with pytest.raises(ValidationError) as exc:
        file_defaults(spec, None, SCHEMA)
    assert exc.value.field == "task.container.configs[1].target"


def test_a_file_name_at_a_mount_is_refused_by_the_api_yet_replayed_as_schema_10_did() -> None:
    """The API refuses a secret's file at a mount's target naming it; the spec's own rule
    (every replica's, on the log) takes it, as schema 10's replicas did, so a replica of
    today never refuses an entry an older one applied."""
    spec = validate_spec(_spec(secrets=[{"name": "db"}],
                               mounts=[{"type": "tmpfs", "target": "/run/secrets/db"}]))
    with pytest.raises(ValidationError) as exc:
        file_defaults(spec, None, SCHEMA)
    assert exc.value.field == "task.container.secrets[0].target"
    assert "mounts[0]" in exc.value.message
    st = _state(10)
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": to_dict(spec)})["ok"]


# --------------------------------------------------------------------------------- the gate

class _Schema10FileRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """FileRef as schema 10's code decodes it: a file name for a target, no owner."""

    name: str
    target: Annotated[str, msgspec.Meta(pattern=r"^$|^[A-Za-z0-9._-]{1,255}$")] = ""
    mode: int = 0o444


@pytest.mark.parametrize(("container", "field"), [
    ({"configs": [{"name": "site", "target": "/etc/nginx/nginx.conf"}]},
     "task.container.configs[0].target"),
    ({"secrets": [{"name": "db"}, {"name": "run", "target": "/etc/db.pass"}]},
     "task.container.secrets[1].target"),
    ({"configs": [{"name": "site", "uid": "101"}]}, "task.container.configs[0].uid"),
    ({"secrets": [{"name": "db", "gid": "0"}]}, "task.container.secrets[0].gid"),
])
def test_below_schema_11_a_path_or_owner_is_refused_naming_the_item_on_propose_and_by_the_state(
        container: dict[str, Any], field: str) -> None:
    cmd = {"op": "service_create", "id": "s1", "now": 1.0,
           "spec": to_dict(validate_spec(_spec(**container)))}
    for writes in (10, 1):
        with pytest.raises(ValidationError) as exc:
            encode_command(cmd, {}, writes)
        assert exc.value.field == field and "schema 11" in exc.value.message
    st = _state(10)
    res = st.apply(cmd)
    assert res["error"]["field"] == field and "s1" not in st.services
    st.apply({"op": "cluster_schema", "schema": SCHEMA})
    assert encode_command(cmd, {}, SCHEMA) is cmd and st.apply(cmd)["ok"]


def test_below_schema_11_older_nodes_are_sent_no_key_they_do_not_know() -> None:
    """A plain reference (a file name, no owner) goes into the log, the leader's task
    creates and the whole state without uid and gid, which schema 10's strict decoder
    would refuse; it reads back the same."""
    full = to_dict(validate_spec(_spec(configs=[{"name": "site"}],
                                       secrets=[{"name": "db", "target": "pw", "mode": 0o400}])))
    cmd = encode_command({"op": "service_create", "id": "s1", "now": 1.0, "spec": full}, {}, 10)
    c = cmd["spec"]["task"]["container"]
    for ref in c["configs"] + c["secrets"]:
        msgspec.convert(ref, _Schema10FileRef)  # (what a schema-10 replica decodes)
    assert full["task"]["container"]["configs"][0]["uid"] == ""  # (not mutated)
    st = _state(10)
    assert st.apply(cmd)["ok"]
    create = ("create", {"id": "t1", "service_id": "s1", "service_name": "app", "slot": 1,
                         "spec": full["task"], "service_version": 1,
                         "desired_state": 512, "status": {"state": 0}})
    led = encode_command({"op": "leader", "term": 1, "now": 2.0, "ops": [create]}, {}, 10)
    assert "uid" not in led["ops"][0][1]["spec"]["container"]["secrets"][0]
    assert st.apply(led)["ok"]
    raw = msgpack.unpackb(state_to_bytes(st), raw=False, strict_map_key=False)
    for ref in raw["services"]["s1"]["spec"]["task"]["container"]["configs"] + \
            raw["tasks"]["t1"]["spec"]["container"]["secrets"]:
        msgspec.convert(ref, _Schema10FileRef)
    assert state_from_bytes(state_to_bytes(st)).services["s1"].spec == st.services["s1"].spec


# ------------------------------------------------------------------------------ the runtime

def _plan(tmp_path: Path, files: dict[str, Any]) -> list[list[str]]:
    spec = Spec()
    build_plan(spec, RootfsPlan(
        stage=tmp_path / "mnt", taskdir=tmp_path / "task", init_files=(),
        tini="/usr/bin/tini-static", layers=[tmp_path / "layer"], default_binds=(),
        default_masked=(), volumes_dir=tmp_path / "volumes", dev_shm_size=1 << 20),
        (MountSpec("tmpfs", "/etc/nginx/conf.d"),), files, User(1000, 1000, (1000,)))
    return spec.ops()


def test_each_file_is_staged_owned_by_its_uid_gid_and_bound_in_the_root_without_noexec(
        tmp_path: Path) -> None:
    """The owner is set where the file is written (the staging tmpfs); the bind onto the
    target is resolved inside the root (WHERE "root": RESOLVE_IN_ROOT, as every mount point)
    after the user's mounts, read-only, nosuid and nodev but not noexec (Docker's)."""
    ops = _plan(tmp_path, {"/etc/nginx/nginx.conf": (b"events {}", 0o440, 101, 102),
                           "/run/secrets/db": (b"pw", 0o400)})
    stage = f"{tmp_path}/mnt/files"
    writes = {op[2]: op[3:6] for op in ops if op[0] == "write" and op[2].startswith(stage)}
    assert writes == {f"{stage}/0": [str(0o440), "101", "102"],
                      f"{stage}/1": [str(0o400), "1000", "1000"]}  # (the task's user)
    binds = [op for op in ops if op[0] == "mount" and op[4].startswith(stage)]
    ro = str(MS_RDONLY | MS_NOSUID | MS_NODEV)
    assert [(op[1], op[2], op[7], op[8]) for op in binds] == [
        ("root", "etc/nginx/nginx.conf", "file", ro), ("root", "run/secrets/db", "file", ro)]
    tmpfs = next(i for i, op in enumerate(ops) if op[:3] == ["mount", "root", "etc/nginx/conf.d"])
    assert tmpfs < ops.index(binds[0])


def test_the_runtime_takes_a_files_owner_and_records_it_never_its_content() -> None:
    cfg = TaskConfig("t1", "h", ("true",), {}, files={
        "/etc/app.conf": (b"secret-ish", 0o440, 101, 101), "/run/secrets/x": (b"x", 0o400)})
    cfg.validate()
    stored = TaskConfig.from_json(cfg.to_json())
    assert b"secret-ish" not in cfg.to_json().encode()
    assert '"uid": 101' in cfg.to_json() and stored.files == {}
    for bad in ((b"x", 0o440, -1, 0), (b"x", 0o440, 101), (b"x", 0o440, "101", 0)):
        with pytest.raises(Exception, match="uid, gid"):
            TaskConfig("t2", "h", ("true",), {}, files={"/a": bad}).validate()  # type: ignore[dict-item]


# ------------------------------------------------------------------------- CLI and Compose

def test_the_cli_takes_dockers_long_and_short_syntax() -> None:
    assert parse_file_ref("source=site,target=/etc/nginx/nginx.conf,uid=101,gid=101,"
                          "mode=0440", "--config") == {
        "name": "site", "target": "/etc/nginx/nginx.conf", "uid": "101", "gid": "101",
        "mode": 0o440}
    assert parse_file_ref("site", "--config") == {"name": "site"}
    assert parse_file_ref("db,target=pw,mode=0400", "--secret") == {
        "name": "db", "target": "pw", "mode": 0o400}
    with pytest.raises(CliError, match="uid=N"):
        parse_file_ref("source=db,owner=1", "--secret")
    args = _subparser("create").parse_args([
        "--name", "web", "--config", "source=site,target=/etc/nginx/nginx.conf,uid=101,"
        "gid=101,mode=0440", "--secret", "source=db,target=/etc/db.pass", "busybox"])
    got = specflags.spec_from_create_args(args)
    assert got["task"]["container"]["configs"] == [{
        "name": "site", "target": "/etc/nginx/nginx.conf", "uid": "101", "gid": "101",
        "mode": 0o440}]
    assert validate_spec(got).task.container.secrets[0].file_path("secret") == "/etc/db.pass"


def test_config_add_replaces_the_reference_at_its_place_old_or_new() -> None:
    """docker's rotation idiom, `--config-rm a --config-add source=b,target=a`, and a
    reference added at a path another one has: the new one replaces it."""
    current = msgspec.to_builtins(validate_spec(_spec(
        configs=[{"name": "site", "target": "site"}, {"name": "app", "target": "/etc/app"}])))
    args = _subparser("update").parse_args([
        "--config-add", "source=site2,target=site", "--config-add",
        "source=app2,target=/etc/app", "web"])
    got = specflags.apply_update_args(current, args)
    assert [(r["name"], r["target"]) for r in got["task"]["container"]["configs"]] == \
        [("site2", "site"), ("app2", "/etc/app")]
    # (and the managers keep the first where it was: shoal.raft.spec.docker_file_defaults)
    kept = docker_file_defaults(validate_spec(got).task.container.configs, "config",
                                validate_spec(current).task.container.configs, SCHEMA)
    assert [r.file_path("config") for r in kept] == ["/run/configs/site", "/etc/app"]


def test_service_inspect_pretty_shows_the_path_the_task_sees() -> None:
    spec = to_dict(validate_spec(_spec(configs=[{"name": "site", "target": "/site"},
                                                {"name": "old"}], secrets=[{"name": "db"}])))
    text = pretty.service({"id": "s1", "name": "app", "spec": spec, "vip": "",
                           "update_status": {"state": "", "message": "", "started_at": 0.0,
                                             "completed_at": 0.0}})
    assert re.search(r"Target:\s+/site\n\s+Source:\s+site", text), text
    assert re.search(r"Target:\s+/run/configs/old\n", text) and "/run/secrets/db" in text


def test_compose_long_and_short_forms_are_dockers(tmp_path: Path) -> None:
    (tmp_path / "site.conf").write_text("server {}")
    st = deploy(tmp_path, """
services:
  web:
    image: nginx:1
    configs:
      - site
      - {source: site, target: /etc/nginx/conf.d/site.conf, uid: "101", gid: "101",
         mode: 0440}
    secrets:
      - db
      - {source: db, target: /etc/app/db.pass, uid: 999}
configs:
  site: {file: ./site.conf}
secrets:
  db: {external: true}
""")
    c = svc(st, "web").task.container
    assert [(r.target, r.uid, r.gid, r.mode) for r in c.configs] == [
        ("site", "", "", 0o444), ("/etc/nginx/conf.d/site.conf", "101", "101", 0o440)]
    assert [(r.target, r.uid) for r in c.secrets] == [("db", ""), ("/etc/app/db.pass", "999")]
    assert st.warnings == []
    # the short form's place, as the managers write it for a new service: /site, 0:0
    written = file_defaults(svc(st, "web"), None, SCHEMA).task.container
    assert [(r.file_path("config"), r.uid) for r in written.configs] == [
        ("/site", "0"), ("/etc/nginx/conf.d/site.conf", "101")]
    assert [(r.file_path("secret"), r.uid) for r in written.secrets] == [
        ("/run/secrets/db", "0"), ("/etc/app/db.pass", "999")]


def test_a_redeploy_of_the_same_file_changes_no_service_old_or_new(tmp_path: Path) -> None:
    """`stack deploy` compares the file with the cluster's spec as the managers would write
    it: `configs: [site]` against /site (0:0) written at schema 11, or against the file name
    a service has kept in /run/configs since before, is no change (nothing rolls)."""
    from shoal.cli.stack import same_spec

    (tmp_path / "site.conf").write_text("server {}")
    st = deploy(tmp_path, """
services:
  web:
    command: serve
    configs: [site, {source: site, target: /etc/site.conf, mode: 0440}]
    secrets: [db]
configs:
  site: {file: ./site.conf}
secrets:
  db: {external: true}
""")
    filed = svc(st, "web")
    written = file_defaults(filed, None, SCHEMA)
    assert same_spec(written, filed)
    old = file_defaults(filed, None, FILE_TARGETS - 1)  # (a schema-10 manager's)
    assert old.task.container.configs[0].target == "site"
    assert same_spec(old, filed)
    moved = file_defaults(msgspec.structs.replace(filed, labels={"x": "1"}), None, SCHEMA)
    assert not same_spec(moved, filed)
