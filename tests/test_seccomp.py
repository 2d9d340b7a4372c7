"""Seccomp (runtime/seccomp.py, the launcher's F record, execdrop's --seccomp-fd): the
default profile's rules checked on real system calls in a filtered child, custom profiles in
Docker's format and their errors, and real tasks — their processes, their exec health checks
and `shoal exec` commands — running under the filter (``Seccomp: 2``), or not when
unconfined.

The runtime tests need root (namespaces, cgroups); the filter tests need only fork.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_runtime_support import needs_root, run_to_end, task

from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.cli.specflags import spec_from_create_args
from shoal.node.health import Check, ExecHelper, HealthConfig, Probes
from shoal.node.hostaccess import host_access
from shoal.raft.errors import ValidationError
from shoal.raft.schema import SECCOMP, encode_command
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.runtime import seccomp
from shoal.runtime.errors import InvalidTaskConfig
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState
from shoal.runtime.rootfs import DEFAULT_CAPABILITIES

pytest_plugins = ("test_runtime_support",)  # its fixtures

DEFAULTS = frozenset(DEFAULT_CAPABILITIES)
# x86_64 call numbers the checks below make
NR = {"getpid": 39, "unshare": 272, "keyctl": 250, "mount": 165, "clone3": 435,
      "socket": 41, "personality": 135, "mkdir": 83, "settimeofday": 164}
CLONE_NEWUSER, CLONE_NEWNS, AF_VSOCK, AF_INET, SOCK_STREAM = 0x10000000, 0x20000, 40, 2, 1

x86_64 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 call numbers")


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def under_filter(program: bytes, calls: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """Make ``calls`` (name, args) in a forked child under ``program``: each one's errno
    (0: it succeeded)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child: only system calls and os._exit)
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            buf = ctypes.create_string_buffer(program, len(program))
            prog = _Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
            if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):
                os._exit(3)  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP
            out = []
            for name, args in calls:
                rc = libc.syscall(NR.get(name, name), *(ctypes.c_ulong(a) for a in args))
                out.append(ctypes.get_errno() if rc < 0 else 0)
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the filtered child failed"
    return json.loads(data)


# ------------------------------------------------------------------ the default profile


@x86_64
def test_the_default_profile_refuses_what_dockers_refuses_and_allows_the_rest() -> None:
    program = seccomp.compiled("", DEFAULTS)
    assert program is not None
    got = under_filter(program, [
        ("getpid", ()), ("mkdir", (0,)),  # (mkdir(NULL): EFAULT, but the call was made)
        ("unshare", (CLONE_NEWUSER,)), ("unshare", (CLONE_NEWNS,)), ("keyctl", (0,)),
        ("mount", (0, 0, 0, 0, 0)), ("settimeofday", (0, 0)),
        ("clone3", (0, 0)), ("socket", (AF_VSOCK, SOCK_STREAM, 0)),
        ("socket", (AF_INET, SOCK_STREAM, 0)),
        ("personality", (0xFFFFFFFF,)), ("personality", (0x0400000,)),
        (470, ()),  # a call newer than libseccomp knows
    ])
    assert got == [0, errno.EFAULT, errno.EPERM, errno.EPERM, errno.EPERM, errno.EPERM,
                   errno.EPERM, errno.ENOSYS, errno.EPERM, 0, 0, errno.EPERM, errno.ENOSYS]


@x86_64
def test_a_capability_allows_the_calls_the_kernel_checks_it_for() -> None:
    """CAP_SYS_ADMIN allows namespaces and clone3 (the kernel then decides); CAP_SYS_TIME
    the clock (settimeofday(NULL, NULL) is a no-op the kernel accepts)."""
    program = seccomp.compiled("", DEFAULTS | {"SYS_ADMIN", "SYS_TIME"})
    assert program is not None
    got = under_filter(program, [("unshare", (0,)), ("clone3", (0, 0)),
                                 ("settimeofday", (0, 0)), ("keyctl", (0,))])
    assert got[0] == 0 and got[1] != errno.ENOSYS and got[2] == 0 and got[3] == errno.EPERM


def test_unconfined_has_no_filter() -> None:
    assert seccomp.compiled("unconfined", DEFAULTS) is None


# ------------------------------------------------------------------- custom profiles

DENY_MKDIR = json.dumps({
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
        # (only for a task without CAP_NET_ADMIN: Docker's excludes)
        {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_NET_ADMIN"]}},
    ]})


@x86_64
def test_a_custom_profile_in_dockers_format_with_includes_and_excludes() -> None:
    assert under_filter(seccomp.compiled(DENY_MKDIR, DEFAULTS) or b"",
                        [("mkdir", (0,)), ("getpid", ())]) == [errno.EACCES, errno.EPERM]
    assert under_filter(seccomp.compiled(DENY_MKDIR, DEFAULTS | {"NET_ADMIN"}) or b"",
                        [("getpid", ())]) == [0]


@pytest.mark.parametrize(("profile", "named"), [
    ("[]", "not a JSON object"),
    ("{", "not JSON"),
    ('{"defaultAction": "SCMP_ACT_NOPE"}', "defaultAction: one of"),
    ('{"syscalls": []}', "defaultAction: one of"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "bogus": 1}', "bogus: unknown key"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": '
     '"SCMP_ACT_ERRNO"}]}', "syscalls[0].names"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": '
     '"SCMP_ACT_ERRNO", "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}]}',
     "syscalls[0].args[0].index"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": '
     '"SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "EQ"}]}]}', "syscalls[0].args[0].op"),
    ('{"defaultAction": "SCMP_ACT_NOTIFY"}', "SCMP_ACT_NOTIFY is not supported"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": -1}', "defaultErrnoRet"),
])
def test_a_malformed_profile_is_refused_naming_the_key(profile: str, named: str) -> None:
    with pytest.raises(ValueError, match=".*".join(map(__import__("re").escape,
                                                         named.split("…")))):
        seccomp.check_profile(profile)
    with pytest.raises(InvalidTaskConfig) as info:
        task("bad", "true", seccomp=profile).validate()
    assert info.value.field == "seccomp"


# ------------------------------------------------------------------------ real tasks

SHOW = "grep Seccomp: /proc/self/status; unshare -U true && echo unshared || echo refused"


@needs_root
async def test_a_task_runs_under_the_default_profile(ctl: ProcessController) -> None:
    st, out, err = await run_to_end(ctl, task("sc-default", "sh", "-c", SHOW))
    assert st.exit_code == 0, (st, err)
    assert out.split() == ["Seccomp:", "2", "refused"], out
    assert "Operation not permitted" in err


@needs_root
async def test_an_unconfined_task_has_no_filter(ctl: ProcessController) -> None:
    st, out, err = await run_to_end(ctl, task("sc-none", "sh", "-c", SHOW,
                                              seccomp="unconfined"))
    assert st.exit_code == 0, (st, err)
    assert out.split() == ["Seccomp:", "0", "unshared"], (out, err)


@needs_root
async def test_a_task_under_a_custom_profile(ctl: ProcessController) -> None:
    st, out, err = await run_to_end(ctl, task(
        "sc-custom", "sh", "-c", "mkdir /tmp/x && echo made || echo refused", seccomp=DENY_MKDIR))
    assert st.exit_code == 0, (st, err)
    assert out.split() == ["refused"] and "Permission denied" in err, (out, err)


@needs_root
async def test_exec_health_checks_take_the_tasks_filter(ctl: ProcessController,
                                                        tmp_path: Path) -> None:
    """An exec check runs in the task under the task's own filter (Docker's exec takes its
    container's profile): without it, a check could do what the task cannot."""
    probes = Probes(HealthConfig(), ExecHelper(tmp_path / "bin",
                                               seccomp_of=ctl.exec_filter))
    check = Check(kind="exec", timeout=10, argv=("sh", "-c", SHOW))
    for tid, setting, expected in (("sc-probe", "", ["Seccomp:", "2", "refused"]),
                                   ("sc-probe-u", "unconfined", ["Seccomp:", "0", "unshared"])):
        # (the check's stderr is in its output: unshare's complaint between the two)
        await ctl.start(task(tid, "sleep", "60", seccomp=setting))
        try:
            st = ctl.status(tid)
            assert st is not None and st.state == RunState.RUNNING and st.pid
            result = await probes(check, st.pid)
            words = result.output.split()
            assert result.exit_code == 0 and words[:2] + words[-1:] == expected, result
        finally:
            await ctl.stop(tid, grace=0)
            await ctl.remove(tid)


# ------------------------------------------------------------- spec, CLI, Compose, roles


def _state(schema: int) -> Any:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": schema})
    return st


@pytest.mark.parametrize("value", ["unconfined", DENY_MKDIR])
def test_the_seccomp_field_waits_for_schema_12(value: str) -> None:
    """A schema-11 node's decoder does not know it (and would run the task with its own
    filter): refused naming the field on propose and by the state machine until the
    schema is 12; the default (no key) goes as before."""
    spec = {"name": "t", "task": {"container": {"command": ["sh"], "seccomp": value}}}
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": spec}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 11)
    assert exc.value.field == "task.container.seccomp" and "schema 12" in exc.value.message
    st = _state(11)
    assert st.apply(cmd)["error"]["field"] == "task.container.seccomp"
    plain = {"op": "service_create", "id": "s2", "now": 1.0,
             "spec": {"name": "p", "task": {"container": {"command": ["sh"]}}}}
    assert "seccomp" not in encode_command(plain, {}, 11)["spec"]["task"]["container"]
    st.apply({"op": "cluster_schema", "schema": SECCOMP})
    assert "error" not in st.apply(cmd)
    assert st.services["s1"].spec.task.container.seccomp == value


def test_a_spec_with_a_bad_profile_names_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        validate_spec({"name": "t", "task": {"container": {
            "command": ["sh"], "seccomp": '{"defaultAction": "SCMP_ACT_ALLOW", "x": 1}'}}})
    assert exc.value.field == "task.container.seccomp" and "x: unknown key" in str(exc.value)


def test_unconfined_and_custom_profiles_need_an_admin() -> None:
    def access(value: str) -> Any:
        return host_access(validate_spec({"name": "t", "task": {"container": {
            "command": ["sh"], "seccomp": value}}}))

    assert access("") is None
    assert access("unconfined") == ("task.container.seccomp", "no seccomp filter")
    field, why = access(DENY_MKDIR)
    assert field == "task.container.seccomp" and "custom seccomp profile" in why


def test_security_opt_flag_as_dockers(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    profile.write_text(DENY_MKDIR)
    p = build_parser()

    def seccomp_of(*flags: str) -> str:
        args = p.parse_args(["service", "create", "--name", "s", *flags, "busybox:1", "sh"])
        spec = validate_spec(spec_from_create_args(args))
        return spec.task.container.seccomp

    assert seccomp_of() == ""
    assert seccomp_of("--security-opt", "seccomp=unconfined") == "unconfined"
    assert seccomp_of("--security-opt", "seccomp:unconfined") == "unconfined"
    assert seccomp_of("--security-opt", f"seccomp={profile}") == DENY_MKDIR
    assert seccomp_of("--security-opt", "seccomp=unconfined",
                      "--security-opt", "seccomp=default") == ""
    for bad, words in (("apparmor=unconfined", "only seccomp="),
                       ("seccomp=/nonexistent.json", "cannot read the seccomp profile"),
                       ("no-new-privileges", "always sets no-new-privileges")):
        with pytest.raises(CliError, match=words):
            seccomp_of("--security-opt", bad)


def test_compose_security_opt(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.json").write_text(DENY_MKDIR)
    (tmp_path / "stack.yml").write_text("""
services:
  free: {image: a:1, security_opt: ["seccomp:unconfined", "no-new-privileges:true"]}
  custom: {image: a:1, security_opt: ["seccomp=profiles/p.json", "apparmor:unconfined"]}
  plain: {image: a:1, security_opt: [label=disable]}
""")
    st = load_stack("app", [tmp_path / "stack.yml"], {})
    got = {s.name: s.task.container.seccomp for s in st.services}
    assert got == {"app_free": "unconfined", "app_custom": DENY_MKDIR, "app_plain": ""}
    assert [w for w in st.warnings if "security_opt" in w] and \
        not [w for w in st.warnings if "no-new-privileges" in w], st.warnings
    assert all("apparmor" not in w or "not applied" in w for w in st.warnings), st.warnings
    (tmp_path / "bad.yml").write_text(
        "services:\n  x: {image: a:1, security_opt: [seccomp=nothere.json]}\n")
    with pytest.raises(ComposeError) as exc:
        load_stack("app", [tmp_path / "bad.yml"], {})
    assert exc.value.path == "services.x.security_opt[0]"
