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
from shoal.cli.specflags import apply_update_args, spec_from_create_args
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


AF_ALG, AF_NETLINK, SOCK_SEQPACKET, HIGH = 38, 16, 5, 1 << 32


@x86_64
def test_the_default_profile_refuses_af_alg_and_vsock_sockets_whatever_the_upper_bits(
) -> None:
    """Docker's profile refuses AF_ALG sockets too (CVE-2026-31431, "Copy Fail": the kernel
    crypto API writes into the page cache, which the host's read-only /usr shares); and the
    kernel reads the family as an int, so a family with bit 32 set is the same family: a
    64-bit comparison must not let it by."""
    program = seccomp.compiled("", DEFAULTS)
    assert program is not None
    got = under_filter(program, [
        ("socket", (AF_ALG, SOCK_SEQPACKET, 0)), ("socket", (HIGH | AF_ALG, SOCK_SEQPACKET, 0)),
        ("socket", (AF_VSOCK, SOCK_STREAM, 0)), ("socket", (HIGH | AF_VSOCK, SOCK_STREAM, 0)),
        ("socket", (AF_INET, SOCK_STREAM, 0)), ("socket", (HIGH | AF_INET, SOCK_STREAM, 0)),
        ("socket", (AF_NETLINK, SOCK_STREAM, 0)), ("socket", (39, SOCK_STREAM, 0)),
    ])
    assert got[:4] == [errno.EPERM] * 4, got
    # (the kernel's own answer for the rest: a socket, or the family's refusal, never EPERM)
    assert errno.EPERM not in got[4:], got


# socketcall(2) through the 32-bit entry (int 0x80 works from a 64-bit process): its
# operation in ebx, its arguments in memory below 4 GiB; prints each result
I386_SOCKETCALL = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
static long call32(long nr, long a, long b) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b) : "memory");
    return ret;
}
int main(void) {
    uint32_t *args = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    int families[] = {2, 40};  /* AF_INET, AF_VSOCK */
    for (int i = 0; i < 2; i++) {
        args[0] = families[i]; args[1] = 1; args[2] = 0;  /* SOCK_STREAM */
        printf("%ld\n", call32(102, 1, (long)(uintptr_t)args));  /* SYS_SOCKET */
    }
    args[0] = (uint32_t)-1; args[1] = 0; args[2] = 0;
    printf("%ld\n", call32(102, 3, (long)(uintptr_t)args));  /* SYS_CONNECT(-1, …) */
    return 0;
}
"""


@x86_64
def test_32_bit_socketcall_cannot_make_a_socket_whose_family_the_filter_cannot_read(
        tmp_path: Path) -> None:
    """libseccomp allows socketcall(SYS_SOCKET) whenever a socket rule allows any family
    (the family is in memory): AF_VSOCK got by through int 0x80. The default profile's
    prefix refuses that operation; socketcall's others still reach the kernel."""
    source, binary = tmp_path / "sc.c", tmp_path / "sc"
    source.write_text(I386_SOCKETCALL)
    import subprocess
    subprocess.run(["cc", "-O1", "-o", str(binary), str(source)], check=True)
    program = seccomp.compiled("", DEFAULTS)
    assert program is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.dup2(w, 1)
            libc = ctypes.CDLL(None, use_errno=True)
            buf = ctypes.create_string_buffer(program, len(program))
            prog = _Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
            if not libc.prctl(38, 1, 0, 0, 0) and not libc.prctl(22, 2, ctypes.byref(prog),
                                                                  0, 0):
                os.execv(str(binary), [str(binary)])
        finally:
            os._exit(3)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert out == [str(-errno.EPERM), str(-errno.EPERM), str(-errno.EBADF)], out


@x86_64
def test_the_default_profile_allows_what_dockers_allows_without_a_capability() -> None:
    """glibc's adjtimex() and ntp_gettime() are clock_adjtime (a read without
    CAP_SYS_TIME: the kernel checks it for changes); process_vm_readv as ptrace (which the
    profile allows, as Docker's since Linux 4.8); name_to_handle_at."""
    program = seccomp.compiled("", DEFAULTS)
    assert program is not None
    timex = ctypes.create_string_buffer(512)  # (struct timex, modes 0: a read)
    got = under_filter(program, [
        (305, (0, ctypes.addressof(timex))),  # clock_adjtime(CLOCK_REALTIME, &tx)
        (310, (os.getpid(), 0, 0, 0, 0, 0)),  # process_vm_readv (nothing to read)
        (303, (0, 0, 0, 0, 0)),  # name_to_handle_at(NULL…): EFAULT, but made
    ])
    assert errno.EPERM not in got, got


@x86_64
def test_cap_sys_boot_reboots_the_task_but_never_loads_a_kernel() -> None:
    """As Docker's: CAP_SYS_BOOT allows reboot (in the task's pid namespace: its end), never
    kexec, which would replace the node's kernel."""
    program = seccomp.compiled("", DEFAULTS | {"SYS_BOOT"})
    assert program is not None
    # (kexec_file_load(-1, -1, 0, NULL, 0), kexec_load with an unknown flag: were either
    # let by, the kernel would refuse them for their arguments, not EPERM)
    assert under_filter(program, [(320, (2**64 - 1, 2**64 - 1, 0, 0, 0)),
                                  (246, (0, 0, 0, 0xFFFF0000))]) == [errno.EPERM] * 2


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
    # (what Docker's decoder refuses, and this one read as something else, or failed on
    # at every start: a string for a list, an architecture libseccomp has no name for)
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpid"], "action": '
     '"SCMP_ACT_ERRNO", "includes": {"caps": "CAP_SYS_ADMIN"}}]}', "syscalls[0].includes.caps"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpid"], "action": '
     '"SCMP_ACT_ERRNO", "excludes": {"arches": [1]}}]}', "syscalls[0].excludes.arches"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpid"], "action": '
     '"SCMP_ACT_ERRNO", "includes": {"minKernel": 5}}]}', "syscalls[0].includes.minKernel"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "a", "names": ["getpid"], '
     '"action": "SCMP_ACT_ERRNO"}]}', "syscalls[0]: both name and names"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_NOPE"]}',
     "architectures[0]"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "SCMP_ARCH_X86_64", '
     '"subArchitectures": [1]}]}', "archMap[0].subArchitectures[0]"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "archMap": [{"architecture": "SCMP_ARCH_X86_64", '
     '"subArchitectures": "SCMP_ARCH_X86"}]}', "archMap[0].subArchitectures: not a list"),
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
    # (Docker splits at the first "=", at ":" only without one: a path may hold a ":")
    (tmp_path / "a:b").mkdir()
    (tmp_path / "a:b" / "p.json").write_text(DENY_MKDIR)
    assert seccomp_of("--security-opt", f"seccomp={tmp_path}/a:b/p.json") == DENY_MKDIR
    assert seccomp_of("--security-opt", "seccomp=unconfined",
                      "--security-opt", "seccomp=default") == ""
    # repeated as docker run's: no-new-privileges is what shoal does anyway
    assert seccomp_of("--security-opt", "seccomp=unconfined",
                      "--security-opt", "no-new-privileges") == "unconfined"
    assert seccomp_of("--security-opt", "no-new-privileges:true") == ""
    for bad, words in (("apparmor=unconfined", "only seccomp="),
                       ("seccomp=/nonexistent.json", "cannot read the seccomp profile"),
                       ("no-new-privileges=false", "sets no-new-privileges for every task")):
        with pytest.raises(CliError, match=words):
            seccomp_of("--security-opt", bad)
    # an update changes the setting only when a seccomp= is given
    current = {"name": "s", "task": {"container": {"image": "busybox:1",
                                                   "seccomp": "unconfined"}}}

    def updated(*flags: str) -> str:
        args = p.parse_args(["service", "update", *flags, "s"])
        return str(apply_update_args(current, args)["task"]["container"]["seccomp"])
    assert updated("--security-opt", "no-new-privileges") == "unconfined"
    assert updated("--security-opt", "seccomp=default") == ""
    assert updated("--env-add", "A=1") == "unconfined"


def test_compose_security_opt(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.json").write_text(DENY_MKDIR)
    (tmp_path / "profiles" / "a:b.json").write_text(DENY_MKDIR)
    (tmp_path / "stack.yml").write_text("""
services:
  free: {image: a:1, security_opt: ["seccomp:unconfined", "no-new-privileges:true"]}
  custom: {image: a:1, security_opt: ["seccomp=profiles/p.json", "apparmor:unconfined"]}
  colon: {image: a:1, security_opt: ["seccomp=profiles/a:b.json"]}
  plain: {image: a:1, security_opt: [label=disable]}
""")
    st = load_stack("app", [tmp_path / "stack.yml"], {})
    got = {s.name: s.task.container.seccomp for s in st.services}
    assert got == {"app_free": "unconfined", "app_custom": DENY_MKDIR, "app_plain": "",
                   "app_colon": DENY_MKDIR}
    assert [w for w in st.warnings if "security_opt" in w] and \
        not [w for w in st.warnings if "no-new-privileges" in w], st.warnings
    assert all("apparmor" not in w or "not applied" in w for w in st.warnings), st.warnings
    (tmp_path / "bad.yml").write_text(
        "services:\n  x: {image: a:1, security_opt: [seccomp=nothere.json]}\n")
    with pytest.raises(ComposeError) as exc:
        load_stack("app", [tmp_path / "bad.yml"], {})
    assert exc.value.path == "services.x.security_opt[0]"
