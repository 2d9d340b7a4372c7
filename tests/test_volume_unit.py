"""Volume drivers as pure code: Docker's --mount volume-driver/volume-opt syntax, the local
driver's NFS translation to mount(2) (this kernel has no NFS client: only the translation is
tested), the sshfs command line, and the scheduler's single-writer rule through the real
orchestrator/scheduler pass and state machine. No network, no processes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers import converge

from shoal.cli import flagvalues
from shoal.cli.errors import CliError
from shoal.raft.errors import SpecError
from shoal.raft.models import Node, NodeRole, NodeState, Task, TaskState, to_dict
from shoal.raft.spec import Mount
from shoal.raft.state import ClusterState
from shoal.runtime import volumes
from shoal.runtime.records import TaskConfig
from shoal.runtime.rootfs import MountSpec

NFS = ("type=volume,src=data,dst=/data,volume-driver=local,volume-opt=type=nfs,"
       "volume-opt=o=addr=10.0.0.5,rw,nfsvers=4,noatime,volume-opt=device=:/export")


# ------------------------------------------------------------------ parsing and translation
def test_docker_nfs_mount_syntax_parses_with_commas_inside_o() -> None:
    m = flagvalues.parse_mount(NFS)
    assert m["volume_driver"] == "local"
    assert m["volume_opts"] == {"type": "nfs", "o": "addr=10.0.0.5,rw,nfsvers=4,noatime",
                                "device": ":/export"}
    Mount(**m)  # the spec accepts it
    quoted = flagvalues.parse_mount('type=volume,src=d,dst=/d,"volume-opt=o=addr=1.2.3.4,ro",'
                                   'volume-opt=type=nfs,readonly')
    assert quoted["volume_opts"] == {"o": "addr=1.2.3.4,ro", "type": "nfs"}
    assert quoted["readonly"] is True


def test_nfs_translates_to_mount2_flags_and_data() -> None:
    call = volumes.local_mount_call(flagvalues.parse_mount(NFS)["volume_opts"])
    assert call == volumes.MountCall(":/export", "nfs", 1024, "addr=10.0.0.5,nfsvers=4")
    ro = volumes.local_mount_call({"type": "nfs4", "o": "addr=fd00::1,ro,nosuid",
                                   "device": "srv:/x"})
    assert ro == volumes.MountCall("srv:/x", "nfs4", 1 | 2, "addr=fd00::1")
    assert volumes.local_mount_call({}) is None  # a plain local directory
    assert volumes.is_network("local", {"type": "nfs", "o": "addr=1.2.3.4",
                                        "device": ":/e"})
    assert not volumes.is_network("local", {})


@pytest.mark.parametrize(("opts", "field"), [
    ({"type": "nfs", "device": ":/e"}, "volume-opt o"),  # no addr=
    ({"type": "nfs", "o": "addr=1.2.3.4", "device": "/e"}, "volume-opt device"),
    ({"o": "addr=1.2.3.4", "device": ":/e"}, "volume-opt type"),
    ({"type": "nfs", "o": "addr=1.2.3.4"}, "volume-opt device"),
    ({"type": "nfs", "o": "addr=1.2.3.4", "device": ":/e", "sshcmd": "a@b:/"},
     "volume-opt sshcmd"),
    ({"single-writer": "maybe"}, "volume-opt single-writer"),
])
def test_bad_local_options_name_the_option(opts: dict[str, str], field: str) -> None:
    with pytest.raises(volumes.VolumeOptionError) as err:
        volumes.check("local", opts)
    assert err.value.field == field


def test_sshfs_command_line_does_not_hang_on_a_dead_server() -> None:
    call = volumes.sshfs_call({"sshcmd": "data@10.1.0.2:/srv/data", "port": "2222",
                               "IdentityFile-secret": "sshkey",
                               "ServerAliveInterval": "2"}, "/v/data", "/proc/1/fd/7")
    assert call.key_secret == "sshkey"
    assert call.argv[:5] == ("sshfs", "data@10.1.0.2:/srv/data", "/v/data", "-p", "2222")
    o = call.argv[6].split(",")
    assert "BatchMode=yes" in o and "reconnect" in o and "ConnectTimeout=10" in o
    assert "ServerAliveInterval=2" in o and "ServerAliveInterval=5" not in o  # overridden
    assert "ServerAliveCountMax=3" in o and "IdentityFile=/proc/1/fd/7" in o
    assert "allow_other" in o


@pytest.mark.parametrize(("opts", "field"), [
    ({}, "volume-opt sshcmd"),
    ({"sshcmd": "host-without-path"}, "volume-opt sshcmd"),
    ({"sshcmd": "u@h:/p", "port": "99999"}, "volume-opt port"),
    ({"sshcmd": "u@h:/p", "password": "x"}, "volume-opt password"),
    ({"sshcmd": "u@h:/p", "ProxyCommand": "sh -c evil"}, "volume-opt ProxyCommand"),
    ({"sshcmd": "u@h:/p", "cache": "yes,allow_root"}, "volume-opt cache"),
    ({"sshcmd": "u@h:/p", "IdentityFile-secret": "../k"}, "volume-opt IdentityFile-secret"),
])
def test_bad_sshfs_options_name_the_option(opts: dict[str, str], field: str) -> None:
    with pytest.raises(volumes.VolumeOptionError) as err:
        volumes.check("sshfs", opts)
    assert err.value.field == field


def test_spec_and_cli_refuse_bad_volume_options() -> None:
    with pytest.raises(SpecError) as err:
        Mount(type="volume", source="d", target="/d", volume_driver="nfsv9")
    assert err.value.field == "volume-driver"
    with pytest.raises(SpecError):
        Mount(type="bind", source="/tmp", target="/d", volume_driver="sshfs",
              volume_opts={"sshcmd": "u@h:/"})
    with pytest.raises(CliError):
        flagvalues.parse_mount("type=volume,src=d,dst=/d,volume-opt=novalue")


def test_mount_spec_with_driver_round_trips_through_the_task_config() -> None:
    m = MountSpec("volume", "/d", "data", False, 0, "sshfs", (("sshcmd", "u@h:/p"),))
    cfg = TaskConfig(task_id="t1", hostname="h", command=("true",), env={},
                     mounts=(m,))
    assert TaskConfig.from_json(cfg.to_json()).mounts == (m,)


def test_sshfs_mount_needs_the_key_secret_among_the_task_files(tmp_path: Any) -> None:
    with pytest.raises(volumes.VolumeOptionError) as err:
        volumes.mount(tmp_path / "v", "sshfs",
                      {"sshcmd": "u@127.0.0.1:/", "IdentityFile-secret": "k"}, {})
    assert "--secret k" in str(err.value)
    with pytest.raises(volumes.VolumeOptionError) as err:
        volumes.mount(tmp_path / "w", "sshfs",
                      {"sshcmd": "u@127.0.0.1:/", "KnownHosts-secret": "hk"}, {})
    assert "--secret hk" in str(err.value) and err.value.field == "volume-opt KnownHosts-secret"


def test_sshfs_host_keys_checked_only_with_a_known_hosts_secret() -> None:
    plain = ",".join(volumes.sshfs_call({"sshcmd": "u@h:/p"}, "/m").argv)
    assert "StrictHostKeyChecking=no" in plain
    call = volumes.sshfs_call({"sshcmd": "u@h:/p", "KnownHosts-secret": "hk",
                               "IdentityFile-secret": "k"}, "/m", "/proc/1/fd/5",
                              "/proc/1/fd/6")
    opts = call.argv[call.argv.index("-o") + 1].split(",")
    assert "StrictHostKeyChecking=yes" in opts and "UserKnownHostsFile=/proc/1/fd/6" in opts
    assert "StrictHostKeyChecking=no" not in opts and "IdentityFile=/proc/1/fd/5" in opts
    assert (call.key_secret, call.known_hosts_secret) == ("k", "hk")
    for bad, field in (({"KnownHosts-secret": "../x"}, "volume-opt KnownHosts-secret"),
                       ({"StrictHostKeyChecking": "no"}, "volume-opt StrictHostKeyChecking")):
        with pytest.raises(volumes.VolumeOptionError) as err:
            volumes.sshfs_call({"sshcmd": "u@h:/p", **bad}, "/m")
        assert err.value.field == field


# ------------------------------------------------------------------ the single-writer rule
SW = {"type": "volume", "source": "data", "target": "/data", "volume_driver": "sshfs",
      "volume_opts": {"sshcmd": "u@10.0.0.9:/srv", "single-writer": "true"}}


def _node(i: int) -> Node:
    return Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
                raft_port=2378, role=NodeRole.WORKER, state=NodeState.READY)


def _cluster(*specs: dict[str, Any]) -> ClusterState:
    st = ClusterState()
    for i in (1, 2):
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(_node(i))})
    for i, spec in enumerate(specs):
        res = st.apply({"op": "service_create", "id": f"s{i}", "now": 1.0, "spec": spec})
        assert "ok" in res, res
    return st


def _report(st: ClusterState, t: Task, state: TaskState, now: float) -> None:
    assert "ok" in st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                             "now": now, "status": {"state": int(state), "timestamp": now}})


def _alive(st: ClusterState) -> list[Task]:
    return sorted((t for t in st.tasks.values() if t.alive), key=lambda t: (t.service_id, t.slot))


def test_second_read_write_user_of_a_single_writer_volume_waits_with_a_reason() -> None:
    spec = {"name": "w", "command": ["sleep", "1"], "replicas": 2, "mounts": [SW]}
    st = _cluster(spec)
    converge(st, 2.0)
    tasks = _alive(st)
    placed = [t for t in tasks if t.node_id]
    waiting = [t for t in tasks if not t.node_id]
    assert len(placed) == 1 and len(waiting) == 1
    assert "volume data is single-writer" in waiting[0].status.err + waiting[0].status.message


def test_read_only_users_and_plain_volumes_are_not_limited() -> None:
    ro = {"name": "r", "command": ["sleep", "1"], "replicas": 2,
          "mounts": [{**SW, "readonly": True}]}
    plain = {"name": "p", "command": ["sleep", "1"], "replicas": 2,
             "mounts": [{**SW, "volume_opts": {"sshcmd": "u@10.0.0.9:/srv"}}]}
    st = _cluster(ro, plain)
    converge(st, 2.0)
    assert all(t.node_id for t in _alive(st))


def test_single_writer_task_moves_on_drain_only_after_the_old_one_ended() -> None:
    st = _cluster({"name": "w", "command": ["sleep", "1"], "replicas": 1, "mounts": [SW]})
    converge(st, 2.0)
    (old,) = _alive(st)
    _report(st, old, TaskState.RUNNING, 3.0)
    assert "ok" in st.apply({"op": "node_update", "id": old.node_id, "now": 4.0,
                             "availability": "drain"})
    converge(st, 5.0)
    new = [t for t in st.tasks.values() if t.id != old.id and t.desired_state <= 512]
    assert new == []  # the old one still runs, holding the volume: its replacement waits
    _report(st, st.tasks[old.id], TaskState.SHUTDOWN, 6.0)
    converge(st, 7.0)
    (moved,) = [t for t in st.tasks.values() if t.id != old.id and t.desired_state <= 512]
    assert moved.node_id and moved.node_id != old.node_id


def test_a_global_task_waiting_on_its_node_holds_no_single_writer_volume() -> None:
    """A global task created PENDING on its node (it reserves more memory than the node
    has) never ran: it holds the volume no more than it holds the memory (``holds``), so a
    replicated task mounting it read-write is placed."""
    from shoal.node.scheduler import single_writers

    hungry = {"name": "g", "mode": {"type": "global"}, "task": {
        "container": {"command": ["sleep", "1"], "mounts": [SW]},
        "resources": {"reservations": {"memory": 1 << 40}}}}
    st = _cluster(hungry)
    converge(st, 2.0)
    assert {t.status.state for t in st.tasks.values()} == {TaskState.PENDING}
    assert single_writers(st.tasks.values(), st.volumes) == {}
    assert "ok" in st.apply({"op": "service_create", "id": "w", "now": 3.0, "spec": {
        "name": "w", "command": ["sleep", "1"], "replicas": 1, "mounts": [SW]}})
    converge(st, 4.0)
    (placed,) = [t for t in st.tasks.values() if t.service_id == "w"]
    assert placed.node_id, placed.status


# ------------------------------------------------------------------ volume records in Raft
def test_volume_records_check_options_refuse_duplicates_and_removal_in_use() -> None:
    st = _cluster()
    bad = st.apply({"op": "volume_create", "id": "v0", "now": 1.0, "name": "data",
                    "driver": "sshfs", "options": {"sshcmd": "nohost"}})
    assert bad["error"]["field"] == "volume-opt sshcmd", bad
    ok = st.apply({"op": "volume_create", "id": "v1", "now": 1.0, "name": "data",
                   "driver": "sshfs", "options": {"sshcmd": "u@10.0.0.9:/srv",
                                                  "single-writer": "true"}})
    assert "ok" in ok, ok
    dup = st.apply({"op": "volume_create", "id": "v2", "now": 1.0, "name": "data"})
    assert dup["error"]["code"] == "exists"
    spec = {"name": "w", "command": ["sleep", "1"], "replicas": 2,
            "mounts": [{"type": "volume", "source": "data", "target": "/data"}]}
    assert "ok" in st.apply({"op": "service_create", "id": "s9", "now": 1.0, "spec": spec})
    busy = st.apply({"op": "volume_remove", "name": "data"})
    assert busy["error"]["code"] == "in_use" and "w" in busy["error"]["message"]
    # the created volume's single-writer option holds for a mount without options of its own
    converge(st, 2.0)
    assert len([t for t in _alive(st) if t.node_id]) == 1
    assert "ok" in st.apply({"op": "service_remove", "id": "s9", "now": 3.0})
    for t in list(st.tasks.values()):
        if t.node_id:
            _report(st, t, TaskState.SHUTDOWN, 4.0)
    converge(st, 5.0)
    assert "ok" in st.apply({"op": "volume_remove", "name": "data"})
    assert not st.volumes


def test_volume_records_survive_the_state_snapshot_format() -> None:
    from shoal.raft.wire import state_from_bytes, state_to_bytes

    st = _cluster()
    assert "ok" in st.apply({"op": "volume_create", "id": "v1", "now": 1.0, "name": "nfs",
                             "options": {"type": "nfs", "o": "addr=10.0.0.5",
                                         "device": ":/x"}})
    back = state_from_bytes(state_to_bytes(st))
    assert back.volumes == st.volumes and back.volumes["nfs"].driver == "local"


def test_a_service_must_use_the_secret_its_volume_takes_its_key_from() -> None:
    st = _cluster()
    assert "ok" in st.apply({"op": "volume_create", "id": "v1", "now": 1.0, "name": "keyed",
                             "driver": "sshfs", "options": {"sshcmd": "u@10.0.0.9:/srv",
                                                            "IdentityFile-secret": "k"}})
    spec: dict[str, Any] = {"name": "w", "command": ["true"], "mounts": [
        {"type": "volume", "source": "keyed", "target": "/data"}]}
    res = st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})
    assert res["error"]["field"] == "task.container.mounts[0]", res
    assert "--secret k" in res["error"]["message"]


def test_volumes_live_tasks_make_implicitly_are_listed_and_cannot_be_removed() -> None:
    """`volume ls` lists, beside the created volumes, the ones live tasks mount without a
    record (Docker lists a node's implicit volumes): a templated source by each task's name,
    with the services and nodes using it; `volume inspect` shows one; `volume rm` is refused
    while it is in use; a task that ended makes none."""
    from shoal.node.errors import Conflict, NotFound
    from shoal.node.volapi import VolumesApi, implicit_volumes
    from shoal.raft.schema import SCHEMA

    st = _cluster()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": SCHEMA})  # (placeholders)
    for i, spec in enumerate(({"name": "db", "command": ["sleep", "1"], "replicas": 2, "mounts": [
        {"type": "volume", "source": "pg-{{.Task.Slot}}", "target": "/data"},
        {"type": "volume", "source": "shared", "target": "/shared", "readonly": True},
        {"type": "volume", "source": "made", "target": "/made"}]},
        {"name": "gone", "command": ["true"], "mounts": [
            {"type": "volume", "source": "old", "target": "/old"}]})):
        assert "ok" in st.apply({"op": "service_create", "id": f"s{i}", "now": 1.0,
                                 "spec": spec})
    assert "ok" in st.apply({"op": "volume_create", "id": "v1", "now": 1.0, "name": "made"})
    converge(st, 2.0)
    (gone,) = [t for t in _alive(st) if t.service_name == "gone"]
    _report(st, gone, TaskState.COMPLETE, 3.0)
    snap = st.snapshot()
    implicit = implicit_volumes(snap)
    assert sorted(implicit) == ["pg-1", "pg-2", "shared"], implicit
    hosts = {n.hostname for n in snap.nodes.values()}
    assert set(implicit["shared"]["nodes"]) <= hosts and implicit["shared"]["services"] == ["db"]
    assert implicit["pg-1"]["implicit"] and implicit["pg-1"]["driver"] == "local"

    class Ctx:
        def require_manager(self) -> Any:
            return self

        def snapshot(self) -> Any:
            return snap

    api = VolumesApi(Ctx())  # type: ignore[arg-type]
    assert [v["name"] for v in api.ls()] == ["made", "pg-1", "pg-2", "shared"]
    assert "implicit" not in api.inspect("made") and api.inspect("pg-2")["services"] == ["db"]
    with pytest.raises(Conflict) as exc:
        asyncio.run(api.remove("shared"))
    assert exc.value.code == "in_use" and "service db" in exc.value.message
    with pytest.raises(NotFound):
        api.inspect("old")  # (its task completed)
