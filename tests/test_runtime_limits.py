"""shoal.runtime: a task's read-only root filesystem (Docker's --read-only), resource limits
(--ulimit) and namespaced sysctls (--sysctl): their rules (shoal.runtime.kernelparams, the same
functions the service spec's validation uses), TaskConfig's checks and JSON form, and what a
real task sees with them.

Real tasks need root (namespaces, cgroups); the image tasks need busybox-static. Fixtures:
tests/test_runtime_support.py.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import needs_root, run_to_end, task

from shoal.runtime.errors import InvalidTaskConfig, LaunchFailed
from shoal.runtime.kernelparams import ULIMITS, check_sysctl, check_ulimit
from shoal.runtime.launcher import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, Spec
from shoal.runtime.process import ProcessController
from shoal.runtime.records import TaskConfig
from shoal.runtime.rootfs import MountSpec, RootfsPlan, User, build_plan

pytest_plugins = ("test_runtime_support",)  # its fixtures

needs_busybox = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")


def _limits(text: str) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits as {"Max open files": (soft, hard)}."""
    out = {}
    for line in text.splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def _sysctl(key: str) -> str:
    return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


# ------------------------------------------------------------------------- the rules (pure)


@pytest.mark.parametrize("limit", [
    ("nofile", 1024, 4096), ("nofile", 4096, 4096), ("core", 0, -1), ("memlock", -1, -1),
    ("stack", 8 << 20, -1), ("nproc", 0, 0),
])  # fmt: skip
def test_a_ulimit_docker_accepts_passes(limit: tuple[str, int, int]) -> None:
    check_ulimit(*limit)


@pytest.mark.parametrize(("limit", "message"), [
    (("nofile", 4096, 1024), "soft limit must not exceed the hard limit: 4096 > 1024"),
    (("nofile", -1, 1024), "unlimited > 1024"),
    (("as", 1, 1), "unknown ulimit 'as'"),
    (("NOFILE", 1, 1), "unknown ulimit"),
    (("nofile", -2, 1), "soft limit must be -1"),
    (("nofile", 1, 1 << 64), "hard limit must be -1"),
    (("nofile", True, 1), "must be an integer"),
    (("nofile", "1", 1), "must be an integer"),
])  # fmt: skip
def test_a_bad_ulimit_is_refused_with_a_message_naming_it(
    limit: tuple[str, int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_ulimit(*limit)


def test_the_ulimit_names_are_dockers() -> None:
    assert sorted(ULIMITS) == [
        "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
        "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
    ]  # fmt: skip


@pytest.mark.parametrize(("key", "host_network"), [
    ("net.ipv4.ip_unprivileged_port_start", False), ("net.ipv4.conf.eth-0_x.forwarding", False),
    ("kernel.shmmax", False), ("kernel.shm_rmid_forced", True), ("kernel.sem", False),
    ("fs.mqueue.msg_max", False), ("fs.mqueue.queues_max", True),
])  # fmt: skip
def test_a_namespaced_sysctl_passes(key: str, host_network: bool) -> None:
    check_sysctl(key, "1", host_network)


@pytest.mark.parametrize(("key", "value", "host_network", "message"), [
    ("vm.swappiness", "10", False, "not namespaced"),
    ("kernel.hostname", "x", False, "not namespaced"),  # UTS: the task's hostname field
    ("kernel.domainname", "x", False, "not namespaced"),
    ("kernel.pid_max", "100", False, "not namespaced"),
    ("fs.file-max", "100", False, "not namespaced"),
    ("net.core.somaxconn", "100", True, "not allowed with the host's network"),
    ("net", "1", False, "not a sysctl name"),
    ("net..ipv4", "1", False, "not a sysctl name"),
    ("net.ipv4/../../kernel/core_pattern", "1", False, "not a sysctl name"),
    ("net/ipv4/ip_forward", "1", False, "not a sysctl name"),
    ("net.ipv4.ip_forward", "", False, "non-empty"),
    ("net.ipv4.ip_forward", "1\n0", False, "without NUL or newline"),
])  # fmt: skip
def test_a_sysctl_that_is_not_the_tasks_own_is_refused(
    key: str, value: str, host_network: bool, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_sysctl(key, value, host_network)


@pytest.mark.parametrize(("changes", "field"), [
    ({"ulimits": (("nofile", 2048, 1024),)}, "ulimits"),
    ({"ulimits": (("nofile", 1, 2), ("nofile", 1, 2))}, "ulimits"),
    ({"ulimits": (("nofile", 1),)}, "ulimits"),
    ({"sysctls": (("vm.swappiness", "1"),)}, "sysctls"),
    ({"sysctls": (("net.core.somaxconn", "1"),), "host_network": True}, "sysctls"),
    ({"sysctls": (("net.core.somaxconn", "1"),), "join_netns": "/proc/1/ns/net"}, "sysctls"),
    ({"sysctls": (("kernel.shmmax", "1"), ("kernel.shmmax", "2"))}, "sysctls"),
    ({"read_only": "yes"}, "read_only"),
])  # fmt: skip
def test_task_config_validate_names_the_field(changes: dict[str, object], field: str) -> None:
    cfg = TaskConfig("t1", "h", ("true",), {}, **changes)  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskConfig) as info:
        cfg.validate()
    assert info.value.field == field


def test_the_new_fields_survive_config_json_and_an_old_config_still_loads() -> None:
    cfg = TaskConfig(
        "t1", "h", ("true",), {}, image="busybox", read_only=True,
        ulimits=(("nofile", 1024, 4096), ("core", -1, -1)),
        sysctls=(("net.core.somaxconn", "1024"), ("kernel.sem", "250 32000 32 128")),
    )  # fmt: skip
    cfg.validate()
    assert TaskConfig.from_json(cfg.to_json()) == cfg
    old = TaskConfig("t2", "h", ("true",), {}).to_json()
    for key in ("read_only", "ulimits", "sysctls"):
        old = old.replace(f'"{key}": ', f'"unused_{key}": ')
    loaded = TaskConfig.from_json(old)
    assert (loaded.read_only, loaded.ulimits, loaded.sysctls) == (False, (), ())


def _plan(tmp_path: Path, layers: list[Path] | None, **kwargs: object) -> list[list[str]]:
    spec = Spec()
    build_plan(
        spec,
        RootfsPlan(
            stage=tmp_path / "mnt", taskdir=tmp_path / "task", init_files=(),
            tini="/usr/bin/tini-static", layers=layers, default_binds=(), default_masked=(),
            volumes_dir=tmp_path / "volumes", dev_shm_size=1 << 20,
        ),
        (MountSpec("tmpfs", "/scratch"),), {}, User(0, 0, (0,)),
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return spec.ops()


def test_the_plan_writes_sysctls_into_the_tasks_proc_before_proc_sys_is_read_only(
    tmp_path: Path,
) -> None:
    ops = _plan(tmp_path, [tmp_path / "layer"], sysctls=(("net.core.somaxconn", "77"),))
    proc = ops.index(["mount", "root", "proc", "proc", "proc", "14", "", "dir", "0", "0"])
    assert ops[proc + 1] == ["sysctl", "net.core.somaxconn", "77"]
    ro_sys = next(i for i, op in enumerate(ops) if op[:3] == ["mount", "root", "proc/sys"])
    assert ro_sys > proc + 1


def test_the_plan_makes_only_an_images_root_mount_read_only_last(tmp_path: Path) -> None:
    root = str(tmp_path / "mnt" / "rootfs")
    remount_ro = ["remount", "host", root, str(MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV), ""]
    ops = _plan(tmp_path, [tmp_path / "layer"], read_only=True)
    assert ops[-2:] == [remount_ro, ["pivot"]]
    assert remount_ro not in _plan(tmp_path, [tmp_path / "layer"])
    # the default root is read-only anyway: the same plan either way
    assert _plan(tmp_path, None, read_only=True) == _plan(tmp_path, None)


# ------------------------------------------------------------------------------ real tasks


@needs_root
@needs_busybox
async def test_a_read_only_image_root_refuses_writes_while_its_mounts_stay_writable(
    ctl: ProcessController, tmp_path: Path, data_dir: Path
) -> None:
    """Docker's --read-only: / and /etc of the image cannot be written (EROFS, nothing of the
    task's reaches the writable layer); a tmpfs mount, a volume and /dev/shm still can.
    Without it the same image root is writable."""
    ctl.images.import_rootfs("bb", busybox_rootfs(tmp_path / "rootfs"))
    mounts = (MountSpec("tmpfs", "/scratch"), MountSpec("volume", "/data", "rovol"))
    script = ("touch /x; echo root=$?; touch /etc/x; echo etc=$?; touch /tmp/x; echo tmp=$?; "
              "touch /scratch/x; echo scratch=$?; touch /data/x; echo data=$?; "
              "touch /dev/shm/x; echo shm=$?")  # fmt: skip
    st, out, err = await run_to_end(ctl, task(
        "rofs", "sh", "-c", script, image="bb", env={"PATH": "/bin"}, mounts=mounts,
        read_only=True))  # fmt: skip
    assert st.exit_code == 0, err
    assert out.split() == ["root=1", "etc=1", "tmp=1", "scratch=0", "data=0", "shm=0"], err
    assert "Read-only file system" in err
    upper = data_dir / "tasks" / "rofs" / "upper"  # only the mount points the plan made
    assert sorted(p.name for p in upper.iterdir()) == ["data", "dev", "proc", "scratch", "sys"]
    st, out, err = await run_to_end(ctl, task(
        "rwfs", "sh", "-c", "touch /x /etc/x; echo root=$?", image="bb",
        env={"PATH": "/bin"}))  # fmt: skip
    assert out.split() == ["root=0"], err


@needs_root
async def test_a_read_only_default_root_task_still_has_its_tmp(ctl: ProcessController) -> None:
    st, out, err = await run_to_end(ctl, task(
        "rodef", "sh", "-c", "touch /tmp/x /run/x; echo tmp=$?; touch /x; echo root=$?",
        read_only=True))  # fmt: skip
    assert st.exit_code == 0, err
    assert out.split() == ["tmp=0", "root=1"]


@needs_root
async def test_ulimits_reach_the_command_run_as_a_non_root_user(ctl: ProcessController) -> None:
    """nofile, memlock and core set (lowered: any process may) for tini and the command,
    here a non-root user's; an unset one stays the agent's."""
    ulimits = (("nofile", 1234, 5678), ("memlock", 1 << 20, 2 << 20), ("core", 0, 0))
    st, out, err = await run_to_end(ctl, task(
        "ulim", "cat", "/proc/self/limits", user="nobody", ulimits=ulimits))  # fmt: skip
    assert st.exit_code == 0, err
    limits = _limits(out)
    assert limits["Max open files"] == ("1234", "5678")
    assert limits["Max locked memory"] == (str(1 << 20), str(2 << 20))
    assert limits["Max core file size"] == ("0", "0")
    soft, hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    assert limits["Max msgqueue size"] == tuple(
        "unlimited" if v == resource.RLIM_INFINITY else str(v) for v in (soft, hard))


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


@needs_root
async def test_a_hard_limit_above_the_agents_is_set_for_a_non_root_user_or_fails_the_start(
    ctl: ProcessController,
) -> None:
    """Raising a hard limit needs CAP_SYS_RESOURCE: the launcher sets the limits as root with
    every capability the agent has, before it becomes the task's user, so a non-root task gets
    an unlimited memlock; an agent without that capability (as in some CI containers) cannot
    give it, and the start fails naming the ulimit."""
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("the agent's memlock is unlimited already: nothing to raise")
    cfg = task("ulup", "cat", "/proc/self/limits", user="nobody",
               ulimits=(("memlock", -1, -1),))  # fmt: skip
    if not _has_cap_sys_resource():
        with pytest.raises(LaunchFailed, match="cannot set ulimit memlock=-1:-1: Operation "
                           "not permitted"):  # fmt: skip
            await ctl.start(cfg)
        return
    st, out, err = await run_to_end(ctl, cfg)
    assert st.exit_code == 0, err
    assert _limits(out)["Max locked memory"] == ("unlimited", "unlimited")


@needs_root
async def test_a_bad_ulimit_is_refused_before_anything_starts(
    ctl: ProcessController, data_dir: Path
) -> None:
    with pytest.raises(InvalidTaskConfig, match="soft limit must not exceed") as info:
        await ctl.start(task("ulbad", "true", ulimits=(("nofile", 4096, 1024),)))
    assert info.value.field == "ulimits"
    assert ctl.status("ulbad") is None


@needs_root
async def test_sysctls_are_set_in_the_tasks_own_namespaces_and_not_on_the_host(
    ctl: ProcessController,
) -> None:
    """net.* in the task's network namespace, kernel.shmmax and fs.mqueue.* in its IPC
    namespace; the host keeps its values, and /proc/sys stays read-only for the command."""
    sysctls = {
        "net.ipv4.ip_unprivileged_port_start": "80",
        "net.core.somaxconn": "1234",
        "kernel.shmmax": "123456789",
        "fs.mqueue.msg_max": "42",
    }
    before = {key: _sysctl(key) for key in sysctls}
    assert all(before[key] != value for key, value in sysctls.items())
    paths = " ".join("/proc/sys/" + key.replace(".", "/") for key in sysctls)
    st, out, err = await run_to_end(ctl, task(
        "sysc", "sh", "-c", f"cat {paths}; echo 9 > /proc/sys/net/core/somaxconn; echo w=$?",
        sysctls=tuple(sysctls.items())))  # fmt: skip
    assert st.exit_code == 0, err
    assert out.split() == [*sysctls.values(), "w=2"], err
    assert "Read-only file system" in err
    assert {key: _sysctl(key) for key in sysctls} == before


@needs_root
async def test_a_host_network_task_sets_its_ipc_sysctls_but_never_net_ones(
    ctl: ProcessController,
) -> None:
    before = _sysctl("kernel.shmmax")
    st, out, err = await run_to_end(ctl, task(
        "sysh", "cat", "/proc/sys/kernel/shmmax", host_network=True,
        sysctls=(("kernel.shmmax", "7654321"),)))  # fmt: skip
    assert (st.exit_code, out.strip()) == (0, "7654321"), err
    assert _sysctl("kernel.shmmax") == before
    with pytest.raises(InvalidTaskConfig, match="host's network") as info:
        await ctl.start(task("sysn", "true", host_network=True,
                             sysctls=(("net.core.somaxconn", "1"),)))  # fmt: skip
    assert info.value.field == "sysctls"


@needs_root
async def test_a_non_namespaced_sysctl_is_refused(ctl: ProcessController) -> None:
    for i, key in enumerate(("vm.swappiness", "kernel.hostname")):
        with pytest.raises(InvalidTaskConfig, match="not namespaced") as info:
            await ctl.start(task(f"sysv{i}", "true", sysctls=((key, "1"),)))
        assert info.value.field == "sysctls"


@needs_root
async def test_a_sysctl_the_kernel_lacks_fails_the_start_naming_it(
    ctl: ProcessController, data_dir: Path
) -> None:
    cfg = task("sysx", "true", sysctls=(("net.ipv4.nonexistent_thing", "1"),))
    with pytest.raises(LaunchFailed, match=r"exit 125.*sysctl net\.ipv4\.nonexistent_thing: "
                       "this kernel has no such setting"):  # fmt: skip
        await ctl.start(cfg)
    assert ctl.status("sysx") is None
    assert list((data_dir / "tasks").iterdir()) == []


def test_group_add_appends_groups_by_name_or_number() -> None:
    """Docker's --group-add: names from the task's /etc/group, numbers as they are; an
    unknown name is refused naming the flag."""
    from shoal.runtime.rootfs import resolve_user

    passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    group = "root:x:0:\napp:x:1000:\nstaff:x:50:app\naudio:x:29:\n"
    assert resolve_user("app", passwd, group).groups == (1000, 50)
    assert resolve_user("app", passwd, group, ("audio", "4242", "staff")).groups == \
        (1000, 50, 29, 4242)
    with pytest.raises(ValueError, match="--group-add"):
        resolve_user("app", passwd, group, ("video",))


def test_capabilities_follow_dockers_rule_within_the_nodes_bounding_set() -> None:
    """moby's TweakCapabilities: ALL in cap_add is everything but cap_drop (a drop was
    ignored); ALL in cap_drop is cap_add alone; and ALL means what this node can give (its
    bounding set), a named capability outside it refused naming it (capset's EPERM before)."""
    from shoal.runtime.rootfs import CAPABILITIES, DEFAULT_CAPABILITIES, capability_mask

    def names(mask: int) -> set[str]:
        return {n for n, bit in CAPABILITIES.items() if mask >> bit & 1}

    assert names(capability_mask(["ALL"], ["SYS_ADMIN"])) == set(CAPABILITIES) - {"SYS_ADMIN"}
    assert names(capability_mask(["NET_ADMIN"], ["ALL"])) == {"NET_ADMIN"}
    assert names(capability_mask(["NET_ADMIN"], ["CHOWN"])) == \
        set(DEFAULT_CAPABILITIES) - {"CHOWN"} | {"NET_ADMIN"}
    node = sum(1 << bit for n, bit in CAPABILITIES.items() if n != "SYS_RESOURCE")
    assert names(capability_mask(["ALL"], [], node)) == set(CAPABILITIES) - {"SYS_RESOURCE"}
    with pytest.raises(ValueError, match="SYS_RESOURCE: not in this node's"):
        capability_mask(["SYS_RESOURCE"], [], node)


@needs_root
async def test_cap_add_all_starts_with_what_the_node_can_give_minus_the_drops(
        ctl: ProcessController) -> None:
    """--cap-add ALL --cap-drop SYS_ADMIN: a real task starts (on a node whose own bounding
    set lacks some capability too: ALL was capset's EPERM there) without SYS_ADMIN."""
    from shoal.runtime.rootfs import CAPABILITIES, bounding_set

    st, out, err = await run_to_end(ctl, task(
        "capall", "sh", "-c", "grep CapEff /proc/self/status", cap_add=("ALL",),
        cap_drop=("SYS_ADMIN",)))
    assert st.exit_code == 0, err
    eff = int(out.split()[1], 16)
    node = bounding_set(Path("/proc/self/status").read_text())
    assert node is not None
    assert eff == node & ~(1 << CAPABILITIES["SYS_ADMIN"]) & sum(
        1 << b for b in CAPABILITIES.values()), (hex(eff), hex(node))


@needs_root
async def test_a_task_with_more_launch_records_than_the_launcher_reads_is_refused_cleanly(
        ctl: ProcessController) -> None:
    """Over launcher.c's 4096 records (here 5,000 environment variables) the start fails
    saying so — not the launcher's "no message" — and leaves no task, fd or process behind;
    a task under it starts."""
    env = {f"V{i}": "x" for i in range(5000)}
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LaunchFailed, match=r"launch records .* more than the launcher's 4096"):
        await ctl.start(task("many", "true", env=env))
    assert "many" not in ctl.tasks() and len(os.listdir("/proc/self/fd")) == fds
    st, _, _ = await run_to_end(ctl, task("fewer", "true", env=dict(list(env.items())[:100])))
    assert st.exit_code == 0, st
