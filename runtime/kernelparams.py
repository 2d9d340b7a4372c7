"""A task's kernel parameters: resource limits (Docker's ``--ulimit``) and namespaced sysctls
(Docker's ``--sysctl``), their names and the rules a value must follow.

Owns: the ulimit names and the sysctl allow-list, and the checks of one ulimit / one sysctl
(``ValueError`` with a message for the user). Pure and import-free, so that the service spec's
validation (raft/podspec.py) applies the very same rules as TaskConfig.validate.
Must not touch: processes, /proc, setrlimit — the launcher (runtime/launcher.c) applies them.
"""

from __future__ import annotations

import re

#: Docker's ``--ulimit`` names (go-units' ulimit table, "as" left out as Docker does); the
#: launcher maps each to its RLIMIT_* (soft and hard; -1 = unlimited, RLIM_INFINITY).
ULIMITS: tuple[str, ...] = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip

#: The largest limit accepted (setrlimit's values are unsigned 64-bit, Docker's int64).
ULIMIT_MAX = (1 << 63) - 1

#: IPC-namespaced sysctls allowed by name (Docker's opts.ValidateSysctl, runc's validator).
IPC_SYSCTLS: frozenset[str] = frozenset({
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
    "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
})  # fmt: skip
#: Prefixes of namespaced sysctls: the task's own IPC namespace (POSIX message queues) and its
#: own network namespace.
IPC_SYSCTL_PREFIX = "fs.mqueue."
NET_SYSCTL_PREFIX = "net."

# Dotted keys only ("net.ipv4.ip_forward"): components of letters, digits, "_" and "-" (the
# interface names of net.ipv{4,6}.conf.IFACE.* included; one with a dot, a VLAN's "eth0.10",
# cannot be named). No empty component, so a key never walks out of /proc/sys.
_SYSCTL_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")
_SYSCTL_KEY_MAX = 256
_SYSCTL_VALUE_MAX = 4096


def check_ulimit(name: str, soft: int, hard: int) -> None:
    """Raise ValueError unless (name, soft, hard) is a limit Docker's ``--ulimit`` accepts:
    a known name, integers >= -1 (-1 = unlimited) and soft <= hard (any soft under an
    unlimited hard; an unlimited soft only under an unlimited hard)."""
    if not isinstance(name, str) or name not in ULIMITS:
        raise ValueError(f"unknown ulimit {name!r}: expected one of {', '.join(ULIMITS)}")
    for what, value in (("soft", soft), ("hard", hard)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"ulimit {name}: the {what} limit must be an integer: {value!r}")
        if not -1 <= value <= ULIMIT_MAX:
            raise ValueError(f"ulimit {name}: the {what} limit must be -1 (unlimited) or "
                             f"0 to {ULIMIT_MAX}: {value}")  # fmt: skip
    if hard != -1 and (soft == -1 or soft > hard):
        shown = "unlimited" if soft == -1 else soft
        raise ValueError(f"ulimit {name}: the soft limit must not exceed the hard limit: "
                         f"{shown} > {hard}")  # fmt: skip


def check_sysctl(key: str, value: str, host_network: bool) -> None:
    """Raise ValueError unless ``key`` is a namespaced sysctl a task may set to ``value``
    (Docker's rule): kernel.msgmax, kernel.msgmnb, kernel.msgmni, kernel.sem, kernel.shmall,
    kernel.shmmax, kernel.shmmni, kernel.shm_rmid_forced and fs.mqueue.* (the task's own IPC
    namespace), net.* (its own network namespace: refused with ``host_network``, where it
    would change the host's). Keys are dotted; the value is the text written to
    /proc/sys/KEY (no NUL or newline)."""
    if not isinstance(key, str) or len(key) > _SYSCTL_KEY_MAX or not _SYSCTL_KEY_RE.fullmatch(
        key
    ):
        raise ValueError(f"not a sysctl name (dotted, as net.ipv4.ip_forward): {key!r}")
    if key.startswith(NET_SYSCTL_PREFIX):
        if host_network:
            raise ValueError(f"sysctl {key} is not allowed with the host's network: it would "
                             "change the node's own setting")  # fmt: skip
    elif key not in IPC_SYSCTLS and not key.startswith(IPC_SYSCTL_PREFIX):
        raise ValueError(f"sysctl {key} is not namespaced (it would change the node's own "
                         f"setting): only {', '.join(sorted(IPC_SYSCTLS))}, "
                         f"{IPC_SYSCTL_PREFIX}* and {NET_SYSCTL_PREFIX}* can be set for a task")
    if not isinstance(value, str) or not value or len(value) > _SYSCTL_VALUE_MAX or re.search(
        r"[\0\n]", value
    ):
        raise ValueError(f"sysctl {key}: the value must be non-empty text without NUL or "
                         f"newline, at most {_SYSCTL_VALUE_MAX} characters: {value!r}")


__all__ = [
    "IPC_SYSCTLS",
    "IPC_SYSCTL_PREFIX",
    "NET_SYSCTL_PREFIX",
    "ULIMITS",
    "ULIMIT_MAX",
    "check_sysctl",
    "check_ulimit",
]
