"""Seccomp filters for tasks: the default profile (Docker's rules), custom profiles in
Docker's JSON format, and their compilation to the BPF program the launcher installs.

Owns: the default profile's rules (:data:`RESTRICTED`, :data:`DENIED`, the argument rules),
the reading of a custom profile (:func:`parse_profile`, errors naming the key), and
:func:`compile_filter` — libseccomp (the C library runc, crun and Docker use, loaded with
ctypes: ``libseccomp.so.2``, Debian's libseccomp2) turns a profile into a classic BPF
program, exported as bytes (``struct sock_filter`` array). The launcher (launcher.c, spec
record ``F``) and the exec helper (execdrop.c, ``--seccomp-fd``) install those bytes with
``prctl(PR_SET_SECCOMP)`` as the last step before their exec: every process of the task,
and every `shoal exec` into it, runs under the filter (``Seccomp: 2`` in /proc/PID/status).
Must not touch: processes, files; a profile is a plain value.

The default profile is an allow-list, as Docker's: every system call libseccomp knows for
this architecture (and its 32-bit compat ones) is allowed except

- :data:`DENIED`: never, whatever the capabilities (the kernel keyring, which is not
  namespaced; io_uring, whose submissions bypass seccomp; long-obsolete calls);
- :data:`RESTRICTED`: only with the capability the kernel checks for them (a task that
  has CAP_SYS_ADMIN may mount, CAP_SYS_TIME set the clock…), as Docker's profile does
  (``includes.caps``): with Docker's default capabilities a task cannot create namespaces,
  mount, load modules, reboot, change the clock, use BPF or perf, or read another
  process's memory;
- argument rules: clone only without namespace flags (unless CAP_SYS_ADMIN), clone3 answers
  ENOSYS (its flags are in memory a filter cannot read; the C library falls back to clone),
  personality only the values Docker allows, socket not for AF_VSOCK.

A call the filter does not know (newer than this libseccomp) fails with ENOSYS, so a C
library falls back to an older call as on an older kernel (runc's rule for calls newer than
its profile); a call the profile refuses fails with EPERM (Docker's).

Errors::

    SeccompError   libseccomp missing or refusing a rule (at start: the task does not run),
                   or a custom profile that is not Docker's format (its key named)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

UNCONFINED = "unconfined"
DEFAULT = ""  # the spec's value for the default profile
# (a custom profile is in the replicated spec; Docker's own is ~20 KiB)
MAX_PROFILE_BYTES = 64 * 1024

# libseccomp's actions (seccomp.h)
ACT_KILL_PROCESS = 0x80000000
ACT_KILL_THREAD = 0x00000000
ACT_TRAP = 0x00030000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000


def act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def act_trace(number: int) -> int:
    return 0x7FF00000 | (number & 0xFFFF)


# comparison operators (enum scmp_compare) by Docker's names
OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
       "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_EQ, _NE, _MASKED_EQ = OPS["SCMP_CMP_EQ"], OPS["SCMP_CMP_NE"], OPS["SCMP_CMP_MASKED_EQ"]
# filter attributes (enum scmp_filter_attr)
_ATTR_ACT_BADARCH, _ATTR_CTL_NNP, _ATTR_CTL_OPTIMIZE = 2, 3, 8

# the compat architectures a native one's filter covers (Docker's archMap)
COMPAT_ARCHES = {"x86_64": ("x86", "x32"), "aarch64": ("arm",), "ppc64le": (),
                 "s390x": ("s390",), "riscv64": ()}

# calls the default profile refuses whatever the task's capabilities
DENIED = frozenset({
    "add_key", "keyctl", "request_key",  # the keyring is the host's, not namespaced
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # (Docker 25's rule)
    "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl", "vm86", "vm86old",
    "create_module", "get_kernel_syms", "query_module", "lookup_dcookie",
    "afs_syscall", "getpmsg", "putpmsg", "security", "tuxcall", "vserver",
})
# calls the default profile allows only with the capability the kernel checks for them
RESTRICTED: dict[str, frozenset[str]] = {
    "SYS_ADMIN": frozenset({
        "mount", "umount", "umount2", "pivot_root", "unshare", "setns", "fsconfig", "fsmount",
        "fsopen", "fspick", "move_mount", "open_tree", "mount_setattr", "quotactl",
        "quotactl_fd", "sethostname", "setdomainname", "swapon", "swapoff", "fanotify_init",
        "name_to_handle_at", "bpf", "perf_event_open"}),
    "SYS_BOOT": frozenset({"reboot", "kexec_load", "kexec_file_load"}),
    "SYS_MODULE": frozenset({"init_module", "finit_module", "delete_module"}),
    "SYS_PACCT": frozenset({"acct"}),
    "SYS_PTRACE": frozenset({"kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                             "process_vm_writev", "userfaultfd"}),
    "SYS_RAWIO": frozenset({"iopl", "ioperm"}),
    "SYS_TIME": frozenset({"settimeofday", "stime", "clock_settime", "clock_settime64",
                           "clock_adjtime", "clock_adjtime64"}),
    "SYS_TTY_CONFIG": frozenset({"vhangup"}),
    "SYS_NICE": frozenset({"get_mempolicy", "mbind", "set_mempolicy", "move_pages",
                           "migrate_pages", "set_mempolicy_home_node"}),
    "SYSLOG": frozenset({"syslog"}),
    "DAC_READ_SEARCH": frozenset({"open_by_handle_at"}),
    # (newer kernels split these out of CAP_SYS_ADMIN: either one will do)
    "BPF": frozenset({"bpf"}),
    "PERFMON": frozenset({"perf_event_open"}),
}
# clone's namespace flags (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET)
CLONE_NAMESPACES = 0x7E020000
# personality(2) values Docker's profile allows: PER_LINUX, UNAME26, PER_LINUX32 and the
# query (0xffffffff)
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40
_X32_BIT = 0x40000000  # an x32 call's number on x86_64


class SeccompError(Exception):
    pass


@dataclass(frozen=True)
class Rule:
    """One rule: ``action`` for the calls ``names`` when every comparison ``args`` holds
    (``(index, op, value, value_two)``; none: always)."""
    names: tuple[str, ...]
    action: int
    args: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class Profile:
    """What a filter is made of: the action for calls no rule names, the architectures it
    covers (libseccomp's names; empty: the native one and its compat ones), and its rules."""
    default_action: int
    rules: tuple[Rule, ...]
    arches: tuple[str, ...] = ()


# ------------------------------------------------------------------------ libseccomp


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompError(f"libseccomp is missing ({exc}): install it (Debian: apt install "
                           "libseccomp2), or run the task with seccomp unconfined") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_remove.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd char *
    lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _arch_token(name: str) -> int:
    token = _lib().seccomp_arch_resolve_name(name.encode())
    if not token:
        raise SeccompError(f"unknown architecture {name!r}")
    return int(token)


def native_arch() -> str:
    """This machine's architecture as libseccomp names it (x86_64, aarch64…)."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@functools.cache
def _table(arch: str) -> dict[int, str]:
    """The calls libseccomp knows on ``arch``: number → name (0-1023; x32's from its
    0x40000000 bit)."""
    lib, libc = _lib(), ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    token = _arch_token(arch)
    base = _X32_BIT if arch == "x32" else 0
    table = {}
    for num in range(base, base + 1024):
        ptr = lib.seccomp_syscall_resolve_num_arch(token, num)
        if ptr:
            table[num] = ctypes.string_at(ptr).decode()
            libc.free(ptr)
    return table


def known_calls(arches: Iterable[str]) -> frozenset[str]:
    """Every system call name libseccomp knows on ``arches``."""
    return frozenset().union(*(_table(arch).values() for arch in arches))


def compile_filter(profile: Profile) -> bytes:
    """The classic BPF program of ``profile`` (``struct sock_filter`` array, 8 bytes an
    instruction) for ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)``. SeccompError if
    libseccomp is missing or refuses a rule (the call and the reason named)."""
    lib = _lib()
    ctx = lib.seccomp_init(profile.default_action)
    if not ctx:
        raise SeccompError("libseccomp refused the default action")
    try:
        lib.seccomp_attr_set(ctx, _ATTR_CTL_NNP, 0)  # (the launcher sets no_new_privs)
        lib.seccomp_attr_set(ctx, _ATTR_CTL_OPTIMIZE, 2)  # a binary tree: fewer jumps a call
        arches = profile.arches or (native_arch(), *COMPAT_ARCHES.get(native_arch(), ()))
        native = int(lib.seccomp_arch_native())
        for arch in arches:
            token = _arch_token(arch)
            if token != native:
                rc = lib.seccomp_arch_add(ctx, token)
                if rc not in (0, -errno.EEXIST):
                    raise SeccompError(f"architecture {arch}: {os.strerror(-rc)}")
        if native_arch() not in arches:
            lib.seccomp_arch_remove(ctx, native)
        for rule in profile.rules:
            if rule.action == profile.default_action:
                continue  # (libseccomp refuses a rule that changes nothing)
            for name in rule.names:
                _add(lib, ctx, rule, name)
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc:
                raise SeccompError(f"exporting the filter: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if profile.default_action == ACT_ALLOW:
            return program
        return _newer_calls_enosys(program, native)
    finally:
        lib.seccomp_release(ctx)


# classic BPF (linux/filter.h, linux/seccomp.h): what the ENOSYS prefix is made of
_LD_W_ABS, _JEQ_K, _JGT_K, _JSET_K, _RET_K = 0x20, 0x15, 0x25, 0x45, 0x06
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH = 0, 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _newer_calls_enosys(program: bytes, native: int) -> bytes:
    """``program`` behind a prefix answering ENOSYS for a native call numbered above every
    call libseccomp knows (runc's patch for calls newer than the profile): the C library
    then falls back to the older call, as on an older kernel, where the profile's EPERM would
    be taken for a refusal (glibc's fchmodat2, clone3). Classic BPF jumps only forward, so
    the program after the prefix runs unchanged."""
    newest = max(_table(native_arch()))
    prefix = [
        _insn(_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        _insn(_JEQ_K, 0, 4, native),               # another architecture: the program
        _insn(_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
        _insn(_JSET_K, 2, 0, _X32_BIT),            # an x32 call: the program
        _insn(_JGT_K, 0, 1, newest),
        _insn(_RET_K, 0, 0, act_errno(errno.ENOSYS)),
    ]
    return b"".join(prefix) + program


def _add(lib: ctypes.CDLL, ctx: int, rule: Rule, name: str) -> None:
    num = lib.seccomp_syscall_resolve_name(name.encode())
    if num == -1:  # __NR_SCMP_ERROR: not a call of any architecture libseccomp knows
        return
    # comparisons on one argument cannot be ANDed by libseccomp: one rule each (runc's way)
    indexes = [a[0] for a in rule.args]
    groups = [rule.args] if len(set(indexes)) == len(indexes) else [(a,) for a in rule.args]
    for group in groups:
        cmps = (_ArgCmp * max(1, len(group)))(*(_ArgCmp(i, op, a, b) for i, op, a, b in group))
        rc = lib.seccomp_rule_add_array(ctx, rule.action, num, len(group), cmps)
        if rc and rc != -errno.EEXIST:
            raise SeccompError(f"system call {name}: libseccomp refused the rule "
                               f"({os.strerror(-rc)})")


# ------------------------------------------------------------------- the default profile


def default_profile(capabilities: Iterable[str]) -> Profile:
    """Docker's rules for a task keeping ``capabilities`` (names without CAP_, as
    shoal.runtime.rootfs's)."""
    caps = set(capabilities)
    allowed_restricted = set().union(*(calls for cap, calls in RESTRICTED.items()
                                       if cap in caps))
    refused = DENIED | (set().union(*RESTRICTED.values()) - allowed_restricted)
    arches = (native_arch(), *COMPAT_ARCHES.get(native_arch(), ()))
    special = {"clone", "clone3", "personality", "socket"}
    plain = sorted(known_calls(arches) - refused - special)
    rules = [Rule(tuple(plain), ACT_ALLOW)]
    if "SYS_ADMIN" in caps:
        rules.append(Rule(("clone", "clone3"), ACT_ALLOW))
    else:
        rules.append(Rule(("clone",), ACT_ALLOW, ((0, _MASKED_EQ, CLONE_NAMESPACES, 0),)))
        rules.append(Rule(("clone3",), act_errno(errno.ENOSYS)))
    rules.extend(Rule(("personality",), ACT_ALLOW, ((0, _EQ, value, 0),))
                 for value in PERSONALITIES)
    rules.append(Rule(("socket",), ACT_ALLOW, ((0, _NE, AF_VSOCK, 0),)))
    return Profile(act_errno(errno.EPERM), tuple(rules), arches)


@functools.lru_cache(maxsize=64)
def compiled(setting: str, capabilities: frozenset[str]) -> bytes | None:
    """The BPF program for a task's ``seccomp`` setting ("" the default profile,
    "unconfined", or a custom profile's JSON) and kept capabilities; None for unconfined."""
    if setting == UNCONFINED:
        return None
    if setting == DEFAULT:
        return compile_filter(default_profile(capabilities))
    return compile_filter(parse_profile(setting, capabilities))


# ------------------------------------------------------- custom profiles (Docker's format)

_ACTIONS = {"SCMP_ACT_KILL": ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": ACT_KILL_THREAD,
            "SCMP_ACT_KILL_PROCESS": ACT_KILL_PROCESS, "SCMP_ACT_TRAP": ACT_TRAP,
            "SCMP_ACT_ERRNO": act_errno(errno.EPERM), "SCMP_ACT_TRACE": act_trace(errno.EPERM),
            "SCMP_ACT_ALLOW": ACT_ALLOW, "SCMP_ACT_LOG": ACT_LOG}
_RULE_KEYS = {"names", "name", "action", "errnoRet", "args", "includes", "excludes",
              "comment"}
_ARG_KEYS = {"index", "value", "valueTwo", "op"}
_FILTER_KEYS = {"caps", "arches", "minKernel"}
_PROFILE_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls",
                 "flags", "listenerPath", "listenerMetadata"}
# Docker's (Go's) architecture names in includes/excludes.arches → libseccomp's
_GO_ARCHES = {"amd64": "x86_64", "386": "x86", "arm64": "aarch64", "ppc64le": "ppc64le",
              "s390x": "s390x", "riscv64": "riscv64"}


def check_profile(text: str) -> dict[str, Any]:
    """A custom profile's JSON, checked for Docker's format; ValueError naming the key
    (``syscalls[3].action``). Pure: the spec check runs it on every replica."""
    if len(text.encode()) > MAX_PROFILE_BYTES:
        raise ValueError(f"the profile is over {MAX_PROFILE_BYTES // 1024} KiB")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object (Docker's seccomp profile format)")
    _known(doc, _PROFILE_KEYS, "")
    _action(doc.get("defaultAction"), "defaultAction")
    _errno_ret(doc.get("defaultErrnoRet"), "defaultErrnoRet")
    if doc.get("listenerPath"):
        raise ValueError("listenerPath: SCMP_ACT_NOTIFY listeners are not supported")
    for i, arch in enumerate(_list(doc.get("architectures"), "architectures")):
        if not isinstance(arch, str) or not arch.startswith("SCMP_ARCH_"):
            raise ValueError(f"architectures[{i}]: not an SCMP_ARCH_ name")
    for i, entry in enumerate(_list(doc.get("archMap"), "archMap")):
        if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), str):
            raise ValueError(f"archMap[{i}].architecture: missing")
    for i, rule in enumerate(_list(doc.get("syscalls"), "syscalls")):
        where = f"syscalls[{i}]"
        if not isinstance(rule, dict):
            raise ValueError(f"{where}: not an object")
        _known(rule, _RULE_KEYS, where)
        names = rule.get("names", [rule["name"]] if "name" in rule else None)
        if not isinstance(names, list) or not names or \
                not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{where}.names: a list of system call names")
        _action(rule.get("action"), f"{where}.action")
        _errno_ret(rule.get("errnoRet"), f"{where}.errnoRet")
        for j, arg in enumerate(_list(rule.get("args"), f"{where}.args")):
            _known(arg, _ARG_KEYS, f"{where}.args[{j}]")
            index = arg.get("index")
            if not isinstance(index, int) or not 0 <= index <= 5:
                raise ValueError(f"{where}.args[{j}].index: 0 to 5")
            for key in ("value", "valueTwo"):
                v = arg.get(key, 0)
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                    raise ValueError(f"{where}.args[{j}].{key}: an unsigned 64-bit integer")
            if arg.get("op") not in OPS:
                raise ValueError(f"{where}.args[{j}].op: one of {', '.join(OPS)}")
        for key in ("includes", "excludes"):
            if rule.get(key) is not None:
                _known(rule[key], _FILTER_KEYS, f"{where}.{key}")
    return doc


def _known(obj: Any, keys: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where or 'the profile'}: not an object")
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise ValueError(f"{where + '.' if where else ''}{unknown[0]}: unknown key")


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: not a list")
    return value


def _action(value: Any, where: str) -> None:
    if value == "SCMP_ACT_NOTIFY":
        raise ValueError(f"{where}: SCMP_ACT_NOTIFY is not supported (no listener)")
    if value not in _ACTIONS:
        raise ValueError(f"{where}: one of {', '.join(_ACTIONS)}")


def _errno_ret(value: Any, where: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 <= value <= 0xFFFF):
        raise ValueError(f"{where}: an errno number, 0 to 65535")


def parse_profile(text: str, capabilities: Iterable[str]) -> Profile:
    """A custom profile (Docker's JSON) for a task keeping ``capabilities``: rules whose
    ``includes`` the task does not meet, or whose ``excludes`` it does, are left out, as
    Docker's. SeccompError naming the key for a profile that is not Docker's format."""
    try:
        doc = check_profile(text)
    except ValueError as exc:
        raise SeccompError(f"seccomp profile: {exc}") from None
    caps = {c.upper().removeprefix("CAP_") for c in capabilities}
    native = native_arch()
    arches: tuple[str, ...] = ()
    for entry in doc.get("archMap") or ():
        names = [_arch_name(entry["architecture"]),
                 *(_arch_name(a) for a in entry.get("subArchitectures") or ())]
        if native in names:
            arches = (native, *(a for a in names if a != native))
    if not arches and doc.get("architectures"):
        arches = tuple(_arch_name(a) for a in doc["architectures"])
    rules = []
    for rule in doc.get("syscalls") or ():
        if not _applies(rule, caps, native):
            continue
        action = _ACTIONS[rule["action"]]
        if rule.get("errnoRet") is not None and rule["action"] == "SCMP_ACT_ERRNO":
            action = act_errno(rule["errnoRet"])
        args = tuple((a["index"], OPS[a["op"]], a.get("value", 0), a.get("valueTwo", 0))
                     for a in rule.get("args") or ())
        rules.append(Rule(tuple(rule.get("names") or [rule["name"]]), action, args))
    default = _ACTIONS[doc["defaultAction"]]
    if doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc.get("defaultErrnoRet") is not None:
        default = act_errno(doc["defaultErrnoRet"])
    return Profile(default, tuple(rules), arches)


def _arch_name(scmp: str) -> str:
    return scmp.removeprefix("SCMP_ARCH_").lower()


def _applies(rule: dict[str, Any], caps: set[str], native: str) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}

    def arch_in(names: list[str]) -> bool:
        return any(_GO_ARCHES.get(a, a) == native for a in names)

    def cap_names(names: list[str]) -> set[str]:
        return {str(c).upper().removeprefix("CAP_") for c in names}

    if inc.get("caps") and not cap_names(inc["caps"]) <= caps:
        return False
    if inc.get("arches") and not arch_in(inc["arches"]):
        return False
    if inc.get("minKernel") and _kernel() < _version(str(inc["minKernel"])):
        return False
    if exc.get("caps") and cap_names(exc["caps"]) & caps:
        return False
    if exc.get("arches") and arch_in(exc["arches"]):
        return False
    return not (exc.get("minKernel") and _kernel() >= _version(str(exc["minKernel"])))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _kernel() -> tuple[int, ...]:
    return _version(platform.release().split("-")[0])
