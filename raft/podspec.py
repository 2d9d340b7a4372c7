"""One container's spec, and the extra containers of a pod (sidecars, init containers).

Owns: the field declaration helper (``decl``) and base record (``_Spec``) every spec record
uses; the container-level records — ``ContainerSpec`` (the task's main container) and its
parts (``Mount``, ``FileRef``, ``HealthCheck``), ``Limits``/``Reservations``/``Resources``,
``RestartPolicy`` — and ``SidecarSpec``, one more container of a task (issue 17, pods);
the reading of Docker's log options (``log_limits``), which the node's runtime config of a
task uses too.
shoal.raft.spec builds the service spec from these and re-exports them, so callers import
everything from there. Must not touch: I/O, clocks, randomness; the records that carry a
spec (``shoal.raft.models``).

A pod (Kubernetes' word) is a task with more than one container::

    TaskSpec
     ├─ container: ContainerSpec            the main container ("main"): the task as before
     ├─ init_containers: (SidecarSpec, ...) run one after the other before the main one;
     │                                       each must exit 0, else the task fails
     └─ sidecars: (SidecarSpec, ...)        started after the main one, in declared order

All of them share the task's network namespace (127.0.0.1 between them, one address on the
task network); a sidecar sees the task's mounts it lists in ``mounts`` (the same volume,
not a copy). Each has its own image (root filesystem), command, env, limits (its own cgroup,
a sibling of the main container's), health check, restart policy and logs. The task is
healthy when every container with a check is; a sidecar that ends is restarted by its own
``restart`` policy, alone; the main container ending ends the task (and its sidecars).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import typing
from typing import Annotated, Any, Literal

import msgspec

from shoal.raft import generic, templates
from shoal.raft.errors import SpecError, ValidationError
from shoal.runtime import volumes
from shoal.runtime.records import parse_signal
from shoal.runtime.rootfs import ULIMITS, cap_name, check_sysctl, check_ulimit
from shoal.runtime.seccomp import MAX_PROFILE_BYTES, UNCONFINED, check_profile

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")  # volumes
# a service's name: Swarm's rule (a DNS label, upper case too: Compose's "webApp"); unique
# and looked up whatever the case (shoal.raft.state.service_named), as DNS names are
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
# an environment variable's name: Docker's rule — anything but '=', NUL and white space
# (Elasticsearch's discovery.type, Spring's server.port); ENV_KEY_RE is the shell's rule,
# all that schema 10 and before took (schema.GATED_VALUES)
ENV_NAME_RE = re.compile(r"^[^=\0\s]{1,256}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# an image reference, Docker's grammar ([HOST[:PORT]/]PATH[:TAG][@sha256:HEX]); the same as
# shoal.runtime.reference.REFERENCE_RE (tests/test_registry_unit.py checks they agree)
_IMG_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMG_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
IMAGE_RE = re.compile(
    rf"^(?=.{{1,400}}$)(?:(?:{_IMG_DOMAIN_PART}(?:\.{_IMG_DOMAIN_PART})*|\[[0-9A-Fa-f:]+\])"
    rf"(?::[0-9]{{1,5}})?/)?{_IMG_COMPONENT}(?:/{_IMG_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_USER_PART = r"([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})"
USER_RE = re.compile(rf"^{_USER_PART}(:{_USER_PART})?$")
# a task's host name: RFC 1123, dotted (mail.example.com), ≤ 64 bytes (the kernel's; schema 14)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,64}}$){_LABEL}(\.{_LABEL})*$")
SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGWINCH")
MAX_REPLICAS = 10_000
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV = 1000
MAX_GRACE = 30 * 86400.0  # (Docker has no bound; schema 10 and before took at most an hour)
OLD_MAX_GRACE = 3600.0
# an extra host's address the node fills in: its own on the task network (Docker's
# host.docker.internal:host-gateway; schema 11)
HOST_GATEWAY = "host-gateway"
DAY = 86400.0
# secret and config names (Docker's rule) and the file names they appear under in a task
OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
MAX_FILE_REFS = 100
MAX_FILE_PATH = 4096  # (PATH_MAX)
# where a secret's or config's file name puts it in the task; an absolute target (schema 11,
# FILE_TARGETS) may be any path but / and these places of the kernel's (Docker's rule)
SECRETS_DIR = "/run/secrets"
CONFIGS_DIR = "/run/configs"  # (shoal's own, kept for references written before schema 11)
FORBIDDEN_FILE_DIRS = ("/proc", "/sys", "/dev")
FILE_TARGETS = 11  # the cluster schema that reads absolute targets, uid and gid
# placeholder values of the right shape, to check what a text with placeholders becomes
_SAMPLE = {p: "x1" for p in templates.PLACEHOLDERS}
# a host name with placeholders (shoal.raft.templates), checked once filled in by the node
HOSTNAME_TEMPLATE_RE = re.compile(r'^(?=.*\{\{)[A-Za-z0-9{}." _-]{1,255}$')
EXTRA_HOST_RE = HOSTNAME_RE  # an /etc/hosts line's name: the same rule (the runtime's)
MAX_EXTRA_HOSTS = 256
MAX_GID = (1 << 31) - 1  # (runc's limit for a group number)
GROUP_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10})$")  # (as the runtime's)
MAX_SYSCTLS = 64
# Docker's --dns, --dns-search, --dns-option: resolv.conf's servers (glibc reads 3; the node
# forwards to every one in turn), search domains (a domain name, or "." for none of the
# host's) and options (ndots:2, timeout:1, edns0, rotate…)
MAX_DNS_SERVERS = 8
MAX_DNS_SEARCH = 32
MAX_DNS_OPTIONS = 16
DNS_SEARCH_RE = re.compile(rf"^(?:\.|(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?)$")
DNS_OPTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$")
# Docker's --log-driver and --log-opt: the drivers that mean shoal's own size-rotated files
# (as Docker's json-file and local are what its `service logs` reads), and their options
LOG_DRIVERS = ("json-file", "local")
LOG_OPTIONS = ("max-size", "max-file")
MIN_LOG_SIZE = 4096  # (the runtime's least log_max_bytes)
MAX_LOG_SIZE = 1 << 40
MAX_LOG_FILES = 100  # (the shim renames every kept file at each rotation)
# Docker's size syntax (go-units RAMInBytes): 10m, 10MB, 10MiB, 1.5g, 512k, bytes; binary units
_LOG_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?$", re.IGNORECASE | re.ASCII)
_LOG_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

def decl(help: str, *, flag: str | None = None, short: str | None = None,
         cli: str | None = None, item: str | None = None, unit: str | None = None,
         metavar: str | None = None, ge: float | None = None, le: float | None = None,
         pattern: str | None = None, max_length: int | None = None,
         title: str | None = None) -> msgspec.Meta:
    """One field's declaration: validation bounds for msgspec, the rest for the CLI/docs."""
    extra = {k: v for k, v in (("flag", flag), ("short", short), ("cli", cli),
                               ("item", item), ("unit", unit), ("metavar", metavar))
             if v is not None}
    bounds = {k: v for k, v in (("ge", ge), ("le", le), ("pattern", pattern),
                                ("max_length", max_length), ("title", title)) if v is not None}
    meta: Any = msgspec.Meta  # (its overloads are too many for mypy to combine)
    return meta(description=help, extra=extra, **bounds)


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every spec record: immutable, unknown fields refused."""

# --------------------------------------------------------------------------- container

class Mount(_Spec, frozen=True):
    """A filesystem mounted into the task (``--mount type=...,src=...,dst=...``)."""

    type: Annotated[Literal["bind", "volume", "tmpfs"], decl(
        "bind: a host path; volume: a named volume kept per node, or without a source an "
        "anonymous one, made empty for the task and removed with it (Docker's; needs "
        "cluster schema 13); tmpfs: memory")]
    target: Annotated[str, decl("absolute path inside the task")]
    source: Annotated[str, decl("host path (bind) or volume name (volume; none: an anonymous "
                                "volume); none for tmpfs")] = ""
    readonly: Annotated[bool, decl("mount read-only")] = False
    tmpfs_size: Annotated[int, decl("tmpfs size; 0 = the kernel's default (half of RAM)",
                                    unit="bytes", ge=0)] = 0
    volume_driver: Annotated[str, decl(
        "volume driver (shoal.runtime.volumes): local (default) or sshfs")] = ""
    volume_opts: Annotated[dict[str, str], decl(
        "the driver's options (Docker's volume-opt), e.g. sshcmd, type, o, device, "
        "single-writer")] = {}
    nocopy: Annotated[bool, decl(
        "volume: do not fill it, when empty, with the image's content at the target "
        "(Docker's volume-nocopy; needs cluster schema 13)")] = False

    def __post_init__(self) -> None:
        t = self.target
        if self.nocopy and self.type != "volume":
            raise SpecError("nocopy", "only a volume mount is filled from the image")
        if self.volume_driver or self.volume_opts:
            if self.type != "volume":
                raise SpecError("volume_driver", "only a volume mount takes a driver")
            if not self.source:
                raise SpecError("volume_driver", "an anonymous volume (no source) is a "
                                "directory of the node's: it takes no driver nor options")
            try:
                volumes.check(self.volume_driver, self.volume_opts)
            except volumes.VolumeOptionError as exc:
                raise SpecError(exc.field, str(exc)) from None
        if not t.startswith("/") or "\0" in t or ".." in t.split("/"):
            raise SpecError("target", "must be an absolute path inside the task")
        if self.type == "bind" and (not self.source.startswith("/")
                                    or ".." in self.source.split("/")):
            raise SpecError("source", "a bind mount's source must be an absolute host path")
        if self.type == "volume" and templates.has_placeholders(self.source):
            # (a volume per slot or node, Docker's idiom: data-{{.Task.Slot}}; the name is
            # checked again once the node has filled it in)
            try:
                templates.check(self.source)
            except ValueError as exc:
                raise SpecError("source", str(exc)) from None
            if not NAME_RE.match(templates.expand(self.source, _SAMPLE, {}) or "-"):
                raise SpecError("source", "must name a volume (lower-case letters, digits, "
                                "'-', '_') once its placeholders are filled in")
        elif self.type == "volume" and self.source and not NAME_RE.match(self.source):
            raise SpecError("source", "must name a volume (lower-case letters, digits, '-', '_')")
        if self.type == "tmpfs" and self.source:
            raise SpecError("source", "a tmpfs mount takes no source")

    @property
    def key(self) -> str:
        """What ``--mount-rm`` names: the target path."""
        return self.target


class FileRef(_Spec, frozen=True):
    """A task's use of a secret or config (``--secret NAME[,target=PATH][,uid=,gid=,mode=]``,
    Docker's): the file the task sees (``file_path``). An absolute ``target`` is that path
    (normalised; not /, nor under /proc, /sys or /dev; no ``..``); a file name (or none: the
    name) is ``/run/secrets/<target>`` for a secret, as Docker's; for a config, where specs
    written before schema 11 put it: ``/run/configs/<target>`` (raft/filerefs.py
    writes Docker's ``/<target>`` for a new reference: the meaning of a committed spec never
    changes under its running tasks). ``uid``/``gid`` own the file ("": the task's user, as
    before schema 11; Docker's default is "0", which new references get)."""

    name: Annotated[str, decl("the secret's (config's) name", pattern=OBJECT_NAME_RE.pattern)]
    target: Annotated[str, decl(
        "where the task sees it: an absolute path (needs cluster schema 11), or a file name "
        "in /run/secrets (a secret) or /run/configs (a config written before schema 11); "
        "empty = the name. The CLI and Compose write Docker's default for a new config, "
        "/NAME", max_length=MAX_FILE_PATH)] = ""
    uid: Annotated[str, decl(
        "the file's owner inside the task, a number (Docker's uid; needs cluster schema 11); "
        "empty = the task's user (references written before schema 11; new ones get "
        "Docker's 0)", max_length=10)] = ""
    gid: Annotated[str, decl(
        "the file's group inside the task, a number (Docker's gid; needs cluster schema "
        "11); empty = the task user's group when uid is empty too (as before schema 11), "
        "else 0", max_length=10)] = ""
    mode: Annotated[int, decl("file mode inside the task (0755: an executable script, as "
                              "Docker's)", ge=0, le=0o777)] = 0o444

    def __post_init__(self) -> None:
        t = self.target
        if t.startswith("/"):
            parts = t.split("/")
            if "\0" in t or "\n" in t or ".." in parts:
                raise SpecError("target", f"must be a clean absolute path (no '..', NUL or "
                                f"newline), got {t!r}")
            norm = posixpath.normpath(t)
            if norm.startswith("//"):
                norm = norm[1:]
            if norm == "/" or any(norm == d or norm.startswith(d + "/")
                                  for d in FORBIDDEN_FILE_DIRS):
                raise SpecError("target", f"cannot be / or under {', '.join(FORBIDDEN_FILE_DIRS)}"
                                f", got {t!r}")
            if norm != t:
                msgspec.structs.force_setattr(self, "target", norm)
        elif t and (not FILE_NAME_RE.match(t) or t in (".", "..")):
            raise SpecError("target", f"must be an absolute path or a file name (no '/'), got "
                            f"{t!r}")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if value and (not (value.isascii() and value.isdigit()) or int(value) > MAX_GID):
                raise SpecError(name, f"must be a number from 0 to {MAX_GID}, got {value!r}")

    @property
    def file_name(self) -> str:
        return self.target or self.name

    def file_path(self, kind: str) -> str:
        """Where the task sees it; ``kind`` "secret" or "config"."""
        return file_path(kind, self.target, self.name)

    @property
    def key(self) -> str:
        return self.name


def file_path(kind: str, target: str, name: str) -> str:
    """The path in the task of a secret's or config's reference (``FileRef.file_path``; the
    CLI's pretty view reads plain values): an absolute target as it is, a file name (or the
    name) in /run/secrets (a secret) or /run/configs (a config)."""
    t = target or name
    if t.startswith("/"):
        return t
    return f"{SECRETS_DIR if kind == 'secret' else CONFIGS_DIR}/{t}"


def check_files(c: ContainerSpec, every: bool = True) -> None:
    """The files of a container's secrets and configs: each at its own path, none at a
    mount's target or above one (the file would be a mount point's directory). Errors name
    the reference's target (``configs[1].target``). ``every`` False (the spec's own rule,
    which every replica applies to the log): the mounts are checked only against absolute
    targets, since schema 10's replicas accepted a file name at a mount's target (its task
    then failed to start), and a replica must never refuse what an older one applied; the
    API checks ``every`` one before proposing (shoal.node.control.services)."""
    seen: dict[str, str] = {}
    mounts = [m.target for m in c.mounts]
    for kind, refs in (("secret", c.secrets), ("config", c.configs)):
        for i, ref in enumerate(refs):
            where = f"{kind}s[{i}].target"
            path = ref.file_path(kind)
            if path in seen:  # (file names: one per kind, as schema 10's rule)
                raise SpecError(where, f"{path} is already the file of {seen[path]}: two "
                                "references cannot share a path")
            seen[path] = f"{kind}s[{i}] ({ref.name})"
            if not every and not ref.target.startswith("/"):
                continue
            for j, target in enumerate(mounts):
                if target == path or target.startswith(path + "/"):
                    raise SpecError(where, f"{path} is {'' if target == path else 'above '}"
                                    f"the target of mounts[{j}] ({target})")


HTTP_CHECK_RE = re.compile(
    r"^(?:(?P<host>[A-Za-z0-9.-]*):)?(?P<port>[0-9]{1,5})(?P<path>/[^\s]*)?$")
MIN_HEALTH_INTERVAL = 0.1


def parse_http_check(text: str) -> tuple[str, int, str]:
    """``[HOST]:PORT/PATH`` → (host, port, path); host "" = 127.0.0.1 (the task's own
    loopback, probed inside its network namespace), path "" = "/". ValueError if malformed."""
    m = HTTP_CHECK_RE.match(text)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        raise ValueError(f"expected [HOST]:PORT/PATH (e.g. :8080/healthz), got {text!r}")
    return m.group("host") or "127.0.0.1", int(m.group("port")), m.group("path") or "/"


class Ulimit(_Spec, frozen=True):
    """One resource limit of the task's processes (Docker's ``--ulimit``, setrlimit(2)).
    ``--ulimit nofile=1024:2048``."""

    name: Annotated[str, decl("the resource: core, cpu, data, fsize, locks, memlock, msgqueue, "
                              "nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack")]
    soft: Annotated[int, decl("the soft limit; -1 = unlimited", ge=-1)]
    hard: Annotated[int, decl("the hard limit, at least the soft one; -1 = unlimited", ge=-1)]

    def __post_init__(self) -> None:
        try:
            check_ulimit(self.name, self.soft, self.hard)
        except ValueError as exc:
            raise SpecError("name" if self.name not in ULIMITS else "soft", str(exc)) from None

    @property
    def key(self) -> str:
        """What ``--ulimit-rm`` names: the resource."""
        return self.name


class HealthCheck(_Spec, frozen=True):
    """Is the task healthy? (Docker's HEALTHCHECK, plus HTTP and TCP probes.) At most one of
    ``command``, ``http``, ``tcp``; none = the image's HEALTHCHECK, if it has one. A zero
    interval/timeout/retries takes the image's value, else Docker's default (30 s, 30 s, 3).
    Probed by the node's agent: the command inside the task's namespaces and cgroup, HTTP and
    TCP from inside its network namespace. A task is healthy after one success, unhealthy
    after ``retries`` consecutive failures (not counting those within ``start_period``), and
    an unhealthy task is stopped and replaced; only healthy tasks receive connections."""

    command: Annotated[str, decl(
        "command run with /bin/sh -c inside the task; exit 0 = healthy",
        flag="--health-cmd", cli="str", metavar="CMD", max_length=4096)] = ""
    exec: Annotated[tuple[str, ...], decl(
        "program and arguments run inside the task without a shell (Docker's "
        "[\"CMD\", ...] form: images without /bin/sh); exit 0 = healthy; the main "
        "container's only; needs cluster schema 6", max_length=4096)] = ()
    http: Annotated[str, decl(
        "HTTP GET from inside the task's network; a 2xx or 3xx answer = healthy",
        flag="--health-http", cli="str", metavar="[HOST]:PORT/PATH", max_length=1024)] = ""
    tcp: Annotated[int, decl("TCP connect to this port from inside the task's network",
                             flag="--health-tcp", cli="int", metavar="PORT", ge=0,
                             le=65535)] = 0
    interval: Annotated[float, decl("time between two checks; 0 = the image's, else 30s",
                                    flag="--health-interval", cli="duration",
                                    unit="seconds", ge=0, le=DAY)] = 0.0
    timeout: Annotated[float, decl("a check taking longer fails; 0 = the image's, else 30s",
                                   flag="--health-timeout", cli="duration", unit="seconds",
                                   ge=0, le=DAY)] = 0.0
    retries: Annotated[int, decl("consecutive failures that make the task unhealthy; "
                                 "0 = the image's, else 3", flag="--health-retries",
                                 cli="int", metavar="N", ge=0, le=1000)] = 0
    start_period: Annotated[float, decl(
        "failures in this time after the start do not count", flag="--health-start-period",
        cli="duration", unit="seconds", ge=0, le=DAY)] = 0.0
    disable: Annotated[bool, decl("no health check, not even the image's",
                                  flag="--no-healthcheck", cli="flag")] = False

    def __post_init__(self) -> None:
        given = [n for n, v in (("command", self.command), ("exec", self.exec),
                                ("http", self.http), ("tcp", self.tcp)) if v]
        if len(given) > 1:
            raise SpecError(given[1], f"give one check: {given[0]} and {given[1]} are both set")
        if self.disable and given:
            raise SpecError("disable", f"no health check, yet {given[0]} is set")
        if self.http:
            try:
                parse_http_check(self.http)
            except ValueError as exc:
                raise SpecError("http", str(exc)) from None
        if "\0" in self.command:
            raise SpecError("command", "must not contain NUL")
        if self.exec and not self.exec[0]:
            raise SpecError("exec", "must not start with an empty string")
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if 0 < value < MIN_HEALTH_INTERVAL:
                raise SpecError(name, f"must be 0 (default) or at least "
                                f"{MIN_HEALTH_INTERVAL}s, got {value}s")


Command = Annotated[tuple[str, ...], decl(
    "the program to run and its arguments; empty = the image's ENTRYPOINT/CMD",
    cli="command", max_length=4096)]


class ContainerSpec(_Spec, frozen=True):
    """What runs: the process, its environment and the files it sees."""

    image: Annotated[str, decl("image [HOST[:PORT]/]NAME[:TAG][@DIGEST]; empty = the host's "
                               "read-only /usr and /etc", flag="--image", cli="str",
                               metavar="[HOST[:PORT]/]NAME[:TAG][@DIGEST]",
                               pattern=f"^$|{IMAGE_RE.pattern}")] = ""
    command: Command = ()
    entrypoint: Annotated[tuple[str, ...], decl(
        "the program that runs instead of the image's ENTRYPOINT, with command as its "
        "arguments (the image's CMD is then not used); empty = the image's (Docker's "
        "--entrypoint, Compose's entrypoint; needs cluster schema 6)", flag="--entrypoint",
        cli="words", metavar="'PROGRAM [ARG...]'", max_length=4096)] = ()
    env: Annotated[dict[str, str], decl("environment variables", flag="--env", short="-e",
                                        cli="map", metavar="KEY=VALUE")] = {}
    workdir: Annotated[str, decl("working directory (absolute path)", flag="--workdir",
                                 short="-w", cli="str", metavar="PATH")] = ""
    user: Annotated[str, decl("user inside the task: NAME, UID or UID:GID; empty = root",
                              flag="--user", short="-u", cli="str", metavar="USER",
                              pattern=f"^$|{USER_RE.pattern}")] = ""
    hostname: Annotated[str, decl("host name inside the task, at most 64 bytes; empty = "
                                  "SERVICE-SLOT; may have a domain (mail.example.com: "
                                  "needs cluster schema 14) and hold placeholders, "
                                  "Docker's: {{.Node.Hostname}}, {{.Task.Slot}}… (needs "
                                  "cluster schema 7)",
                                  flag="--hostname", cli="str", metavar="NAME",
                                  pattern=f"^$|{HOSTNAME_RE.pattern}|"
                                          f"{HOSTNAME_TEMPLATE_RE.pattern}")] = ""
    stop_signal: Annotated[str, decl(
        "signal that asks the task to stop: a name (SIGTERM, QUIT), a number, or a real-time "
        "one as Docker names them (SIGRTMIN+3); one beyond SIGTERM, SIGINT, SIGQUIT, SIGHUP, "
        "SIGUSR1, SIGUSR2, SIGKILL and SIGWINCH needs cluster schema 7",
        flag="--stop-signal", cli="str", metavar="SIGNAL", max_length=16)] = "SIGTERM"
    stop_grace_period: Annotated[float, decl(
        "time between the stop signal and SIGKILL", flag="--stop-grace-period",
        cli="duration", unit="seconds", ge=0, le=MAX_GRACE)] = 10.0
    mounts: Annotated[tuple[Mount, ...], decl(
        "filesystems mounted into the task (a volume without src: an anonymous one)",
        flag="--mount", cli="list", item="mount",
        metavar="type=bind|volume|tmpfs,src=...,dst=...[,readonly]", max_length=64)] = ()
    secrets: Annotated[tuple[FileRef, ...], decl(
        "secrets the task sees as files: /run/secrets/NAME, or target=FILE (in "
        "/run/secrets) or target=/ABSOLUTE/PATH; owned by uid:gid (Docker's default 0:0), "
        "mode 0444 unless given (an absolute target, uid and gid need cluster schema 11)",
        flag="--secret", cli="list", item="secret",
        metavar="NAME|source=NAME[,target=PATH][,uid=N][,gid=N][,mode=0400]",
        max_length=MAX_FILE_REFS)] = ()
    configs: Annotated[tuple[FileRef, ...], decl(
        "configs the task sees as files: /NAME (Docker's default), or target=/ABSOLUTE/PATH "
        "(target=FILE: /FILE); owned by uid:gid (default 0:0), mode 0444 unless given; 0755 "
        "makes a script the command can run. A config a service had before cluster schema "
        "11 stays in /run/configs (an absolute target, uid and gid need schema 11)",
        flag="--config", cli="list", item="config",
        metavar="NAME|source=NAME[,target=PATH][,uid=N][,gid=N][,mode=0444]",
        max_length=MAX_FILE_REFS)] = ()
    healthcheck: HealthCheck = HealthCheck()
    registry_auth: Annotated[bool, decl(
        "nodes pull the image with the cluster's stored credentials for its registry "
        "(`shoal registry login`; the CLI's --with-registry-auth)")] = False
    # Docker's security and kernel settings of a container (needs cluster schema 7)
    read_only: Annotated[bool, decl(
        "the task's root filesystem is read-only; its mounts (volumes, tmpfs), /dev/shm and "
        "the default root's /tmp stay writable (Docker's --read-only; needs cluster schema 7)",
        flag="--read-only", cli="flag")] = False
    cap_add: Annotated[tuple[str, ...], decl(
        "capabilities added to Docker's default set: NET_ADMIN, SYS_PTRACE, … or ALL (needs "
        "cluster schema 7)", flag="--cap-add", cli="list", item="cap", metavar="CAP",
        max_length=64)] = ()
    group_add: Annotated[tuple[str, ...], decl(
        "more supplementary groups of the task's user: names in the image's /etc/group or "
        "numbers (Docker's --group-add; on update --group-add/--group-rm; needs cluster "
        "schema 7)", flag="--group", cli="list", item="group", metavar="GROUP",
        max_length=32)] = ()
    cap_drop: Annotated[tuple[str, ...], decl(
        "capabilities removed from Docker's default set (ALL: every one; cap_add then adds "
        "back; needs cluster schema 7)", flag="--cap-drop", cli="list", item="cap",
        metavar="CAP", max_length=64)] = ()
    extra_hosts: Annotated[tuple[str, ...], decl(
        "lines of the task's /etc/hosts: NAME:IP (Docker's --host, Compose's extra_hosts; "
        "needs cluster schema 7)", flag="--host", cli="list", item="host", metavar="NAME:IP",
        max_length=MAX_EXTRA_HOSTS)] = ()
    ulimits: Annotated[tuple[Ulimit, ...], decl(
        "resource limits of the task's processes (needs cluster schema 7)", flag="--ulimit",
        cli="list", item="ulimit", metavar="NAME=SOFT[:HARD]", max_length=len(ULIMITS))] = ()
    sysctls: Annotated[dict[str, str], decl(
        "kernel parameters set in the task's own namespaces: net.* (not on the host's "
        "network), kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.* (Docker's --sysctl; "
        "needs cluster schema 7)", flag="--sysctl", cli="map", metavar="KEY=VALUE")] = {}
    # Docker's per-service log settings (needs cluster schema 7)
    log_driver: Annotated[str, decl(
        "where the task's output goes: \"\" (the node's), json-file or local, which all mean "
        "shoal's size-rotated files on the node that `service logs` reads; another driver "
        "(syslog, journald, gelf…) is refused (Docker's --log-driver, Compose's "
        "logging.driver; needs cluster schema 7)", flag="--log-driver", cli="str",
        metavar="DRIVER", max_length=64)] = ""
    log_options: Annotated[dict[str, str], decl(
        "the task's log files: max-size, the size a file is rotated before passing (10m, 1g, "
        "512k or bytes; at least 4k; the node's default 10m), and max-file, the files kept "
        "per stream, the active one included (1 to 100; the node's default 3). Docker's "
        "--log-opt, Compose's logging.options; on update --log-opt replaces them all, as "
        "docker's (needs cluster schema 7)", flag="--log-opt", cli="map",
        metavar="KEY=VALUE")] = {}
    # Docker's terminal, OOM and label settings of a container (needs cluster schema 8)
    tty: Annotated[bool, decl(
        "the command's stdin, stdout and stderr are one pseudo-terminal (its output goes to "
        "the task's stdout log; a shell waits for input on it for ever). The terminal ends "
        "with the task's shim: should the shim die, the task gets SIGHUP, as from a hung-up "
        "terminal (Docker's --tty, Compose's tty; needs cluster schema 8)", flag="--tty",
        short="-t", cli="flag")] = False
    stdin_open: Annotated[bool, decl(
        "the command's stdin stays open, never written: a read waits instead of seeing "
        "end-of-file (Docker's OpenStdin, Compose's stdin_open; needs cluster schema 8)",
        flag="--stdin-open", cli="flag")] = False
    oom_score_adj: Annotated[int, decl(
        "the task's OOM score adjustment, -1000 (never killed first) to 1000 (killed first); "
        "0 leaves the agent's own (normally 0); below 0 needs a node whose agent has "
        "CAP_SYS_RESOURCE (Docker's --oom-score-adj, "
        "Compose's oom_score_adj; needs cluster schema 8)", flag="--oom-score-adj", cli="int",
        metavar="N", ge=-1000, le=1000)] = 0
    labels: Annotated[dict[str, str], decl(
        "the container's labels (the service's are --label): metadata shown by `task "
        "inspect` and `service inspect` (Docker's --container-label, Compose's labels; needs "
        "cluster schema 8)", flag="--container-label", cli="map",
        metavar="KEY=VALUE")] = {}
    # Docker's seccomp setting of a container (needs cluster schema 12)
    seccomp: Annotated[str, decl(
        "the task's seccomp profile (system calls it may make): \"\" Docker's default rules "
        "(without the capability that allows them, no namespaces, mounts, kernel modules, "
        "clock changes, reboot, BPF or perf; never the kernel keyring, io_uring, kexec, or "
        "AF_ALG and AF_VSOCK sockets), \"unconfined\" none, or a custom profile in Docker's "
        "JSON "
        "format. Its execs and exec health checks run under it too. Unconfined and custom "
        "profiles need an admin (Docker's --security-opt seccomp=unconfined|PATH, Compose's "
        "security_opt; needs cluster schema 12)", flag="--security-opt", cli="seccomp",
        metavar="seccomp=unconfined|PATH", max_length=MAX_PROFILE_BYTES)] = ""
    # Docker's DNS settings of a container (needs cluster schema 7)
    dns: Annotated[tuple[str, ...], decl(
        "DNS servers (IPv4/IPv6 addresses) for the names that are not the cluster's: the "
        "node's DNS server forwards the task's other queries to them instead of the node's "
        "own resolvers (service names still resolve); a task on the host's network gets them "
        "in its /etc/resolv.conf (Docker's --dns, Compose's dns; needs cluster schema 7)",
        flag="--dns", cli="list", item="nameserver", metavar="IP",
        max_length=MAX_DNS_SERVERS)] = ()
    dns_search: Annotated[tuple[str, ...], decl(
        "search domains of the task's /etc/resolv.conf, after shoal's own and instead of the "
        "host's (\".\": none of the host's) (Docker's --dns-search, Compose's dns_search; "
        "needs cluster schema 7)", flag="--dns-search", cli="list", item="domain",
        metavar="DOMAIN", max_length=MAX_DNS_SEARCH)] = ()
    dns_options: Annotated[tuple[str, ...], decl(
        "options of the task's /etc/resolv.conf: ndots:N (replaces shoal's ndots:1), "
        "timeout:N, attempts:N, rotate, edns0, use-vc, … (Docker's --dns-option, Compose's "
        "dns_opt; needs cluster schema 7)", flag="--dns-option", cli="list",
        item="resolv_option", metavar="OPTION", max_length=MAX_DNS_OPTIONS)] = ()

    def __post_init__(self) -> None:
        _check_command(self.command)
        _check_command(self.entrypoint, "entrypoint")
        _check_env(self.env)
        name = self.image.split("@", 1)[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        if len(name) > 255:
            raise SpecError("image", "the image name is longer than 255 characters")
        _check_workdir(self.workdir)
        try:
            parse_signal(self.stop_signal)
        except ValueError as exc:
            raise SpecError("stop_signal", str(exc)) from None
        if templates.has_placeholders(self.hostname):
            try:
                templates.check(self.hostname)
            except ValueError as exc:
                raise SpecError("hostname", str(exc)) from None
        targets = [m.target for m in self.mounts]
        if len(set(targets)) != len(targets):
            raise SpecError("mounts", "two mounts use the same target")
        check_files(self, every=False)
        for what in ("cap_add", "cap_drop"):
            for cap in getattr(self, what):
                try:
                    cap_name(cap)
                except ValueError as exc:
                    raise SpecError(what, str(exc)) from None
        for group in self.group_add:
            if not GROUP_RE.match(group) or (group.isdigit() and int(group) > MAX_GID):
                raise SpecError("group_add", f"{group!r} is not a group name or a number up "
                                f"to {MAX_GID}")
        _check_extra_hosts(self.extra_hosts)
        if self.seccomp not in ("", UNCONFINED):
            try:
                check_profile(self.seccomp)
            except ValueError as exc:
                raise SpecError("seccomp", f"not a seccomp profile: {exc}") from None
        names = [u.name for u in self.ulimits]
        if len(set(names)) != len(names):
            raise SpecError("ulimits", "two limits of the same resource")
        if len(self.sysctls) > MAX_SYSCTLS:
            raise SpecError("sysctls", f"at most {MAX_SYSCTLS}")
        for key, value in self.sysctls.items():
            try:
                check_sysctl(key, value, host_network=False)
            except ValueError as exc:
                raise SpecError("sysctls", str(exc)) from None
        _check_dns(self.dns, self.dns_search, self.dns_options)
        if self.log_driver and self.log_driver not in LOG_DRIVERS:
            raise SpecError("log_driver", f"{self.log_driver!r} is not supported: shoal keeps "
                            "a task's logs in size-rotated files on its node (`service logs` "
                            "reads them); json-file and local mean those, or leave it empty")
        try:
            log_limits(self.log_options)
        except ValueError as exc:
            raise SpecError("log_options", str(exc)) from None


# --------------------------------------------------------------------------- resources

class Limits(_Spec, frozen=True):
    memory: Annotated[int, decl("memory limit (swap is always off); 0 = unlimited",
                                flag="--limit-memory", cli="bytes", unit="bytes",
                                metavar="SIZE", ge=0, le=1 << 50)] = 0
    cpu: Annotated[float, decl("CPU limit (0.5 = half a core); 0 = unlimited",
                               flag="--limit-cpu", cli="float", unit="CPUs", metavar="CPUS",
                               ge=0, le=1024)] = 0.0
    pids: Annotated[int, decl("maximum number of processes; 0 = unlimited",
                              flag="--limit-pids", cli="int", metavar="N", ge=0,
                              le=1 << 22)] = 0


class Reservations(_Spec, frozen=True):
    memory: Annotated[int, decl("memory the scheduler keeps free for the task",
                                flag="--reserve-memory", cli="bytes", unit="bytes",
                                metavar="SIZE", ge=0, le=1 << 50)] = 0
    cpu: Annotated[float, decl("CPUs the scheduler keeps free for the task",
                               flag="--reserve-cpu", cli="float", unit="CPUs", metavar="CPUS",
                               ge=0, le=1024)] = 0.0
    generic_resources: Annotated[dict[str, int], decl(
        "generic resources the task reserves, kind → count (Swarm's: a node advertises "
        "them, `node update --generic-resource-add gpu=UUID1`); the task runs only where "
        "that many are free, and gets DOCKER_RESOURCE_<KIND> (the named IDs it was given, "
        "or the count). Kinds ignore case (needs cluster schema 10)",
        flag="--generic-resource", cli="map", item="count", metavar="KIND=N")] = {}

    def __post_init__(self) -> None:
        try:
            generic.check_reservation(self.generic_resources, "generic_resources")
        except ValidationError as exc:
            raise SpecError(exc.field, exc.message.partition(": ")[2]) from None


class Resources(_Spec, frozen=True):
    limits: Limits = Limits()
    reservations: Reservations = Reservations()


class RestartPolicy(_Spec, frozen=True):
    """Swarm's restart policy: when a task ends by itself, is its slot refilled?"""

    condition: Annotated[Literal["none", "on-failure", "any"], decl(
        "restart a task that ended: never, only after a failure, or always",
        flag="--restart-condition", cli="choice")] = "any"
    delay: Annotated[float, decl("wait between a task ending and its replacement",
                                 flag="--restart-delay", cli="duration", unit="seconds",
                                 ge=0, le=DAY)] = 1.0
    max_attempts: Annotated[int, decl("restarts allowed per slot within the window; "
                                      "0 = no limit", flag="--restart-max-attempts",
                                      cli="int", metavar="N", ge=0, le=1_000_000)] = 0
    window: Annotated[float, decl("period over which restart attempts are counted; "
                                  "0 = forever", flag="--restart-window", cli="duration",
                                  unit="seconds", ge=0, le=DAY * 365)] = 0.0



# --------------------------------------------------------------------------- pods

CONTAINER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
MAIN_CONTAINER = "main"  # the name of a task's own container (task.container)
MAX_SIDECARS = 8


class SidecarSpec(_Spec, frozen=True):
    """One more container of the task: a sidecar (``task.sidecars``) or an init container
    (``task.init_containers``). It joins the task's network namespace (localhost is shared
    with the main container), has its own root filesystem, cgroup, logs and, for a sidecar,
    health check and restart policy. An init container runs to its end before the main
    container starts; it must exit 0 (it takes no health check and no restart policy)."""

    name: Annotated[str, decl("container name, unique in the task (`main` is the task's own "
                              "container): `service logs --container NAME`",
                              pattern=CONTAINER_NAME_RE.pattern)]
    image: Annotated[str, decl("image [HOST[:PORT]/]NAME[:TAG][@DIGEST]; empty = the host's "
                               "read-only /usr and /etc",
                               pattern=f"^$|{IMAGE_RE.pattern}")] = ""
    command: Command = ()
    env: Annotated[dict[str, str], decl("environment variables")] = {}
    workdir: Annotated[str, decl("working directory (absolute path)")] = ""
    user: Annotated[str, decl("user inside the container: NAME, UID or UID:GID; empty = root",
                              pattern=f"^$|{USER_RE.pattern}")] = ""
    stop_signal: Annotated[Literal[SIGNALS], decl(  # type: ignore[valid-type]
        "signal that asks the container to stop (the task's grace period applies)")
    ] = "SIGTERM"
    mounts: Annotated[tuple[str, ...], decl(
        "targets of the task's volume and bind mounts (task.container.mounts) this container "
        "sees too, at the same path: the same files, shared", max_length=64)] = ()
    limits: Annotated[Limits, decl(
        "the container's own limits (memory, cpu, pids), as task.resources.limits: its "
        "own cgroup")] = Limits()
    healthcheck: Annotated[HealthCheck, decl(
        "the container's health check, as task.container.healthcheck (probed in the "
        "container); the task is healthy when all its checked containers are")] = HealthCheck()
    restart: Annotated[RestartPolicy, decl(
        "when the container ends, restart it alone (condition, delay, max_attempts, window "
        "as task.restart); the main container is not restarted")] = RestartPolicy()

    def __post_init__(self) -> None:
        if self.name == MAIN_CONTAINER:
            raise SpecError("name", f"{MAIN_CONTAINER!r} is the task's own container")
        if self.healthcheck.exec:
            raise SpecError("healthcheck.exec", "a sidecar's check is a command, http or "
                            "tcp (exec is the main container's)")
        if not self.command and not self.image:
            raise SpecError("command", "is required (the program to run and its arguments) "
                            "when the container names no image")
        _check_command(self.command)
        _check_env(self.env)
        _check_workdir(self.workdir)
        if len(set(self.mounts)) != len(self.mounts):
            raise SpecError("mounts", "a mount is listed twice")


def check_pod(main: ContainerSpec, sidecars: tuple[SidecarSpec, ...],
              inits: tuple[SidecarSpec, ...]) -> None:
    """The rules that span a task's containers (TaskSpec.__post_init__ calls it): unique
    names, shared mounts that the main container has, init containers without a health check
    or restart policy. SpecError names the field below the task (``sidecars[1].name``)."""
    if len(sidecars) > MAX_SIDECARS or len(inits) > MAX_SIDECARS:
        raise SpecError("sidecars" if len(sidecars) > MAX_SIDECARS else "init_containers",
                        f"at most {MAX_SIDECARS} containers")
    targets = {m.target: m.type for m in main.mounts}
    seen: set[str] = set()
    for kind, group in (("init_containers", inits), ("sidecars", sidecars)):
        for i, c in enumerate(group):
            if c.name in seen:
                raise SpecError(f"{kind}[{i}].name", f"container name {c.name!r} is used twice")
            seen.add(c.name)
            for j, target in enumerate(c.mounts):
                if target not in targets:
                    raise SpecError(f"{kind}[{i}].mounts[{j}]", f"{target!r} is not a target "
                                    "of the task's mounts (task.container.mounts)")
                if targets[target] == "tmpfs":
                    raise SpecError(f"{kind}[{i}].mounts[{j}]", f"{target!r} is a tmpfs, "
                                    "memory of the main container's own: share a volume or a "
                                    "bind mount")
            if kind == "init_containers":
                if c.healthcheck != HealthCheck():
                    raise SpecError(f"{kind}[{i}].healthcheck",
                                    "an init container runs to its end: no health check")
                if c.restart != RestartPolicy():
                    raise SpecError(f"{kind}[{i}].restart", "an init container runs once; "
                                    "a failed one fails the task (the task's restart policy "
                                    "applies)")


def _check_command(command: tuple[str, ...], field: str = "command") -> None:
    """A container's command (the main one's, a sidecar's or an init container's), or the
    main one's entrypoint."""
    if command and not command[0]:
        raise SpecError(field, "must not start with an empty string")
    if sum(len(a) for a in command) > MAX_COMMAND_BYTES:
        raise SpecError(field, "is too long")


def _check_workdir(workdir: str) -> None:
    """A container's working directory: absolute, no NUL (empty: the image's)."""
    if workdir and (not workdir.startswith("/") or "\0" in workdir):
        raise SpecError("workdir", f"must be an absolute path, got {workdir!r}")


def _check_extra_hosts(lines: tuple[str, ...]) -> None:
    """``NAME:IP`` each: a host name (dots allowed) and an IPv4 or IPv6 address, or Docker's
    ``host-gateway`` (HOST_GATEWAY: the node's address its tasks reach it at, filled in by
    the node)."""
    for line in lines:
        name, sep, addr = line.partition(":")
        if not sep or not EXTRA_HOST_RE.match(name):
            raise SpecError("extra_hosts", f"expected NAME:IP, got {line!r}")
        if addr == HOST_GATEWAY:
            continue
        try:
            if "%" in addr:  # (a zone, fe80::1%eth0: not a line /etc/hosts can hold)
                raise ValueError(addr)
            ipaddress.ip_address(addr.strip("[]"))
        except ValueError:
            raise SpecError("extra_hosts", f"{addr!r} in {line!r} is not an IP address") \
                from None


def _check_dns(servers: tuple[str, ...], search: tuple[str, ...],
               options: tuple[str, ...]) -> None:
    """Docker's --dns (IP addresses), --dns-search (domain names, "." alone: none of the
    host's) and --dns-option (resolv.conf option words) of a container."""
    for addr in servers:
        try:
            if "%" in addr:  # (a zone: docker's ValidateIPAddress refuses it too)
                raise ValueError(addr)
            ipaddress.ip_address(addr)
        except ValueError:
            raise SpecError("dns", f"{addr!r} is not an IP address") from None
    for domain in search:
        if not DNS_SEARCH_RE.match(domain):
            raise SpecError("dns_search", f"{domain!r} is not a domain name")
    for option in options:
        if not DNS_OPTION_RE.match(option):
            raise SpecError("dns_options", f"{option!r} is not a resolv.conf option (letters, "
                            "digits, ':', '.', '_', '-': ndots:2, timeout:1, edns0…)")


def parse_log_size(text: str) -> int:
    """Docker's size of a log file (``max-size``) in bytes: ``10m`` → 10485760 (binary
    units k, m, g, t, p; ``10MB``, ``10MiB`` alike), a plain number is bytes. ValueError
    unless it is between 4 KiB (the runtime's least) and 1 TiB."""
    m = _LOG_SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"max-size: expected a size such as 10m, 1g, 512k or a number of "
                         f"bytes, got {text!r}")
    size = int(float(m.group(1)) * _LOG_SIZE_UNITS[m.group(2).lower()])
    if not MIN_LOG_SIZE <= size <= MAX_LOG_SIZE:
        raise ValueError(f"max-size: {text!r} is {size} bytes; expected at least 4k "
                         f"({MIN_LOG_SIZE} bytes) and at most 1t")
    return size


def log_limits(options: dict[str, str]) -> tuple[int, int]:
    """A container's log options (Docker's --log-opt) → (bytes per file, files per stream),
    each 0 where not given (the node's own). ValueError naming the option that is wrong: a
    key other than max-size and max-file, a bad size, a count that is not 1 to 100."""
    for key in options:
        if key not in LOG_OPTIONS:
            raise ValueError(f"{key!r} is not supported: shoal's log files take max-size "
                             "and max-file")
    size = parse_log_size(options["max-size"]) if "max-size" in options else 0
    files = 0
    if "max-file" in options:
        text = options["max-file"].strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LOG_FILES:
            raise ValueError(f"max-file: expected a number of files from 1 to "
                             f"{MAX_LOG_FILES}, got {options['max-file']!r}")
        files = int(text)
    return size, files


def _check_env(env: dict[str, str]) -> None:
    if len(env) > MAX_ENV:
        raise SpecError("env", f"at most {MAX_ENV} variables")
    for k, v in env.items():
        if not ENV_NAME_RE.match(k):
            raise SpecError("env", f"name {k!r} is invalid (1 to 256 characters, "
                            "no '=' nor white space)")
        if "\0" in v:
            raise SpecError("env", f"value of {k} must not contain NUL")


def container_rows() -> list[str]:
    """docs/api.md's rows for one SidecarSpec's fields (``task.sidecars[]`` and
    ``task.init_containers[]`` take the same)."""
    import json
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    names = {"str": "string", "Limits": "object", "HealthCheck": "object",
             "RestartPolicy": "object"}
    for f in msgspec.structs.fields(SidecarSpec):
        base, help_ = _field_info(f.name)
        default: Any = f.default
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        shown = "required" if default is msgspec.NODEFAULT else "its defaults" \
            if isinstance(default, msgspec.Struct) else \
            f"`{json.dumps(list(default) if isinstance(default, tuple) else default)}`"
        tname = names.get(getattr(base, "__name__", ""), "") or (
            "list of string" if typing.get_origin(base) is tuple else
            "map of string" if typing.get_origin(base) is dict else "string")
        rows.append(f"| `{f.name}` | {tname} | {shown} | {help_.replace('|', '/')} |")
    return rows


def sidecar_help(path: str) -> str:
    """The declared help of a SidecarSpec field named by an error path
    (``task.sidecars[0].image`` → the image's help); "" if the path is not one."""
    m = re.search(r"(?:sidecars|init_containers)\[\d+\]\.([a-z_]+)$", path)
    if m is None or m.group(1) not in SidecarSpec.__struct_fields__:
        return ""
    return _field_info(m.group(1))[1]


def _field_info(name: str) -> tuple[Any, str]:
    """(type without Annotated, help) of a SidecarSpec field."""
    tp = typing.get_type_hints(SidecarSpec, include_extras=True)[name]
    if typing.get_origin(tp) is not Annotated:
        return tp, ""
    base, *metas = typing.get_args(tp)
    meta = next((m for m in metas if isinstance(m, msgspec.Meta)), None)
    return base, (meta.description or "") if meta is not None else ""
