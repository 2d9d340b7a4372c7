"""What in a request reaches beyond a task's own sandbox — the node's files, network, kernel,
devices, the cluster's registry credentials — and so needs the admin role.

Owns: the rule (pure functions of a spec, a volume's driver and options, a secret's name).
Swarm treats any API client as root on every node; shoal has roles (shoal.node.users), and
an operator deploys and changes applications but must not be root on a node by way of a
service spec. As Kubernetes' baseline Pod Security Standard: no host paths (bind mounts), no
host network, no capabilities beyond the container defaults (Docker's set), no device or
network-filesystem mounts made by the node, no seccomp profile but the default (Kubernetes'
baseline refuses Unconfined; a custom profile may allow anything), plus shoal's own: no
negative OOM score (a task the kernel never kills first, over the node's own daemons), no
registry credentials (``registry-auth.*`` secrets: ``registry login`` is an admin's), no
``exec --privileged``.
An update of a service that has any of these needs an admin too (a new image would run with
them); scaling or rolling it back does not (no new code). Must not touch: the store, the
network, the users (shoal.node.users decides who is an admin).
"""

from __future__ import annotations

from collections.abc import Mapping

from shoal.raft.spec import Mount, ServiceSpec
from shoal.runtime.rootfs import DEFAULT_CAPABILITIES, cap_name
from shoal.runtime.seccomp import UNCONFINED

# the secrets holding the cluster's registry credentials (shoal.node.registries: `registry
# login` makes registry-auth.HOST)
SECRET_PREFIX = "registry-auth."
# volume options of the local driver that make the node mount something (a device, NFS):
# Docker's `-o type=nfs -o o=addr=... -o device=:/path`
LOCAL_MOUNT_OPTS = frozenset({"type", "device", "o"})


def volume_access(driver: str, opts: Mapping[str, str]) -> str:
    """Why a volume with ``driver`` and ``opts`` reaches the node ("" if it does not)."""
    if driver in ("", "local") and LOCAL_MOUNT_OPTS & {k.lower() for k in opts}:
        return "a local volume the node mounts (type, device, o: a disk or a network share)"
    return ""


def _mount_access(m: Mount) -> str:
    if m.type == "bind":
        return f"a bind mount of the node's {m.source}"
    if m.type == "volume":
        return volume_access(m.volume_driver, m.volume_opts)
    return ""


def host_access(spec: ServiceSpec) -> tuple[str, str] | None:
    """The first thing ``spec`` asks for that reaches beyond the task's sandbox, as (the
    spec field, what it is), or None."""
    c = spec.task.container
    for i, m in enumerate(c.mounts):
        why = _mount_access(m)
        if why:
            return f"task.container.mounts[{i}]", why
    if spec.task.network_mode == "host":
        return "task.network_mode", "the node's own network (network mode host)"
    extra = sorted({cap_name(x) for x in c.cap_add} - set(DEFAULT_CAPABILITIES))
    if extra:
        return "task.container.cap_add", f"capabilities beyond Docker's defaults " \
            f"({', '.join(extra)})"
    if c.seccomp:
        return "task.container.seccomp", "no seccomp filter" if c.seccomp == UNCONFINED \
            else "a custom seccomp profile (it may allow any system call)"
    if c.oom_score_adj < 0:
        return "task.container.oom_score_adj", "a negative OOM score (the kernel would kill " \
            "the node's own processes first)"
    for i, ref in enumerate(c.secrets):
        if ref.name.startswith(SECRET_PREFIX):
            return f"task.container.secrets[{i}]", f"the registry credentials {ref.name}"
    return None


def secret_access(name: str) -> str:
    """Why writing the secret ``name`` needs an admin ("" if it does not)."""
    if name.startswith(SECRET_PREFIX):
        return f"the registry credentials {name} (`registry login`/`logout`)"
    return ""


__all__ = ["host_access", "secret_access", "volume_access"]
