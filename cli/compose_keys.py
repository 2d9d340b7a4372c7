"""The per-key handlers of Compose service keys, and the value readers they use.

Owns: reading one Compose value into the spec being built (``_Service.set``): the converters
(``as_int``, ``as_duration``, ``as_size``…, each raising ComposeError with the value's path),
the ``Rule`` record and the handlers of the keys that need more than a conversion (ports,
volumes, secrets/configs references, healthcheck test…), and the warnings collector. The table
that maps every key to its rule, ``KEYS``, lives in shoal.cli.compose. Must not touch: the
cluster, the spec's declarations (shoal.raft.spec), the file-level objects (top-level
secrets/configs/volumes/networks are read in shoal.cli.compose).

Errors: ``ComposeError`` (shoal.cli.errors) whose message starts with the path of the value.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.cli.compose_env import PORT_RE, _as_map, read_env_file
from shoal.cli.errors import CliError, ComposeError
from shoal.cli.flagvalues import (
    host_ip,
    parse_duration,
    parse_size,
    port_range,
    publish_ports,
    seccomp_setting,
    split_security_opt,
    with_host_ip,
)
from shoal.raft.podspec import LOG_DRIVERS, LOG_OPTIONS


@dataclass(frozen=True)
class FileObject:
    """A secret or config of the stack: created from ``data`` unless ``external``."""

    kind: str  # "secret" | "config"
    key: str  # its key in the file (what services name)
    name: str  # its name in the cluster
    data: bytes | None  # None when external
    labels: dict[str, str] = field(default_factory=dict)
    # named after its content (STACK_KEY-DIGEST): a changed file is a new object, the
    # services using it roll to it, and the old one is removed by a later deploy
    versioned: bool = False

    @property
    def external(self) -> bool:
        return self.data is None


IGNORED = "ignored: it does not apply to a stack (Swarm ignores it too)"
NOT_YET = "not supported yet"


# ----------------------------------------------------------------------------- value readers

def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "nothing"}.get(type(v), type(v).__name__)


def _expected(path: str, what: str, v: Any) -> ComposeError:
    shown = repr(v) if isinstance(v, (str, int, float, bool)) else _type_name(v)
    return ComposeError(path, f"expected {what}, got {shown}")


def as_str(v: Any, path: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _expected(path, "a string", v)
    return str(v)


def as_int(v: Any, path: str) -> int:
    if isinstance(v, bool):
        raise _expected(path, "an integer", v)
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", v):
        return int(v)
    raise _expected(path, "an integer", v)


def as_float(v: Any, path: str) -> float:
    if isinstance(v, bool):
        raise _expected(path, "a number", v)
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v)) if isinstance(v, str) else float("nan")
    except ValueError:
        pass
    raise _expected(path, "a number", v)


def as_bool(v: Any, path: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise _expected(path, "true or false", v)


def as_map(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _expected(path, "a mapping", v)
    return {str(k): x for k, x in v.items()}


def as_list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise _expected(path, "a list", v)
    return v


def as_duration(v: Any, path: str) -> float:
    """Go's duration syntax (``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(v, bool):
        raise _expected(path, "a duration such as 10s or 1m30s", v)
    if isinstance(v, (int, float)):
        if v < 0:
            raise ComposeError(path, f"a duration cannot be negative, got {v}")
        return float(v)
    if not isinstance(v, str):
        raise _expected(path, "a duration such as 10s or 1m30s", v)
    try:
        return parse_duration(v, path)
    except CliError as exc:
        raise ComposeError("", str(exc)) from None


def as_size(v: Any, path: str) -> int:
    """``512M``, ``1g``, ``64mb`` or a number of bytes."""
    if isinstance(v, bool):
        raise _expected(path, "a size such as 512M", v)
    if isinstance(v, int):
        if v < 0:
            raise ComposeError(path, f"a size cannot be negative, got {v}")
        return v
    if not isinstance(v, str):
        raise _expected(path, "a size such as 512M", v)
    try:
        return parse_size(v, path)
    except CliError as exc:
        raise ComposeError("", str(exc)) from None


def as_command(v: Any, path: str) -> list[str]:
    """A string (split like a shell) or a list of strings."""
    if isinstance(v, str):
        try:
            return shlex.split(v)
        except ValueError as exc:
            raise ComposeError(path, f"cannot split {v!r}: {exc}") from None
    return [as_str(x, f"{path}[{i}]") for i, x in enumerate(as_list(v, path))]


def as_str_list(v: Any, path: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    return [as_str(x, f"{path}[{i}]") for i, x in enumerate(as_list(v, path))]


def as_labels(v: Any, path: str) -> dict[str, str]:
    """A ``KEY=VALUE`` list or a mapping → a map of strings."""
    m = _as_map(v) if isinstance(v, list) else v
    return {k: _env_value(x, f"{path}.{k}") or "" for k, x in as_map(m, path).items()}


def _env_value(v: Any, path: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return as_str(v, path)


# ----------------------------------------------------------------------------- translation

class _Warnings:
    """Warnings keyed by what they name, each reported once with the services it concerns."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], list[str]] = {}
        self.plain: list[str] = []

    def add(self, key: str, why: str, service: str = "") -> None:
        services = self._by_key.setdefault((key, why), [])
        if service and service not in services:
            services.append(service)

    def render(self) -> list[str]:
        out = list(dict.fromkeys(self.plain))
        for (key, why), services in self._by_key.items():
            who = f" (service{'s' if len(services) > 1 else ''} {', '.join(services)})" \
                if services else ""
            out.append(f"{key}: {why}{who}")
        return out


@dataclass
class _Service:
    """One service being translated: the spec dict it builds and what it may refer to."""

    stack: str
    key: str  # its key under services:
    path: str  # "services.KEY"
    project_dir: Path
    env: Mapping[str, str]
    objects: dict[str, dict[str, FileObject]]  # "secret"/"config" → key → object
    volumes: dict[str, str]  # key under volumes: → the volume's name in the cluster
    warnings: _Warnings
    networks: dict[str, str] = field(default_factory=dict)  # key → name in the cluster
    spec: dict[str, Any] = field(default_factory=dict)
    env_files: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    restart: dict[str, Any] | None = None  # from restart: (used without deploy.restart_policy)
    domainname: str = ""  # from domainname: (joined onto the host name)
    # a volume's name in the cluster → (driver, driver_opts) declared under volumes:
    volume_drivers: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    health_test_given: bool = False
    mounts: list[dict[str, Any]] = field(default_factory=list)
    mount_paths: list[str] = field(default_factory=list)  # where each mount was written
    spec_paths: dict[str, str] = field(default_factory=dict)  # spec path → compose path

    def set(self, spec_path: str, value: Any, compose_path: str) -> None:
        node = self.spec
        *parents, leaf = spec_path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        self.spec_paths[spec_path] = compose_path

    def warn(self, key: str, why: str = NOT_YET) -> None:
        self.warnings.add(key, why, self.key)


Handler = Callable[[_Service, Any, str], None]


@dataclass(frozen=True)
class Rule:
    """How one Compose key is read: ``handle`` writes the spec; ``section`` means a mapping
    whose sub-keys have their own rules; else the key is reported with ``why``."""

    handle: Handler | None = None
    section: bool = False
    why: str = ""


SECTION = Rule(section=True)
IGNORE = Rule(why=IGNORED)
LATER = Rule(why=NOT_YET)


def _to(spec_path: str, conv: Callable[[Any, str], Any]) -> Rule:
    def handle(svc: _Service, v: Any, path: str) -> None:
        svc.set(spec_path, conv(v, path), path)
    return Rule(handle)


def _only(value: Any, why: str, conv: Callable[[Any, str], Any] = as_str) -> Rule:
    """A key whose only supported value is what shoal does anyway (``order: stop-first``);
    another value is reported as not supported yet."""
    def handle(svc: _Service, v: Any, path: str) -> None:
        if conv(v, path) != value:
            svc.warn(_rel(path), f"{NOT_YET}: {why}")
    return Rule(handle)


def _rel(path: str) -> str:
    """``services.web.deploy.mode`` → ``deploy.mode`` (a warning's key)."""
    return re.sub(r"\[\d+\]", "", path.split(".", 2)[2]) if path.count(".") >= 2 else path


# -- handlers ------------------------------------------------------------------------------

def _image(svc: _Service, v: Any, path: str) -> None:
    svc.set("task.container.image", as_str(v, path), path)


def _command(svc: _Service, v: Any, path: str) -> None:
    svc.set("task.container.command", as_command(v, path), path)


def _entrypoint(svc: _Service, v: Any, path: str) -> None:
    svc.entrypoint = as_command(v, path)


def _environment(svc: _Service, v: Any, path: str) -> None:
    out: dict[str, str] = {}
    if isinstance(v, list):
        for i, item in enumerate(v):
            text = as_str(item, f"{path}[{i}]")
            key, sep, value = text.partition("=")
            if sep:
                out[key] = value
            elif key in svc.env:  # a bare name: the value from the environment, if set
                out[key] = svc.env[key]
    else:
        for key, value in as_map(v, path).items():
            given = _env_value(value, f"{path}.{key}")
            if given is None:
                given = svc.env.get(key)
            if given is not None:
                out[key] = given
    svc.environment = out
    svc.spec_paths["task.container.env"] = path


def _env_file(svc: _Service, v: Any, path: str) -> None:
    items = [v] if isinstance(v, str) else as_list(v, path)
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(v, list) else path
        required = True
        if isinstance(item, dict):
            m = as_map(item, where)
            for k in m:
                if k not in ("path", "required", "format") and not k.startswith("x-"):
                    raise ComposeError(f"{where}.{k}", "unknown key (not in the Compose "
                                       "Specification)")
            if "path" not in m:
                raise ComposeError(f"{where}.path", "is required")
            required = as_bool(m.get("required", True), f"{where}.required")
            item = m.get("path")
        file = svc.project_dir / as_str(item, where)
        if not required and not file.exists():
            continue
        svc.env_files.update(read_env_file(file, where, svc.env))




def _range(text: str, path: str) -> list[int]:
    try:
        return list(port_range(text))
    except ValueError as exc:
        raise ComposeError(path, f"invalid port or range: {exc}") from None


def _publish(published: str, target: str, proto: str, path: str) -> list[dict[str, Any]]:
    """The PortSpecs of a ports item, paired as ``--publish`` pairs them (``publish_ports``:
    ranges of one length port by port, a published range with one target all to it)."""
    try:
        return publish_ports(published, target, proto)
    except ValueError as exc:
        raise ComposeError(path, str(exc)) from None


def _ports(svc: _Service, v: Any, path: str) -> None:
    """``ports:``; the long syntax's ``mode: host`` items go to ``endpoint.host_ports``."""
    ports: list[dict[str, Any]] = []
    host: list[dict[str, Any]] = []
    for i, item in enumerate(as_list(v, path)):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            long = as_map(item, where)
            (host if long.get("mode") == "host" else ports).extend(
                _long_port(svc, long, where))
            continue
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) \
            else as_str(item, where)
        m = PORT_RE.match(text)
        if m is None:
            raise ComposeError(where, f"expected [[IP:]PUBLISHED:]TARGET[/tcp|udp], got "
                               f"{text!r}")
        proto = (m.group("proto") or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise ComposeError(where, f"protocol {proto!r}: shoal publishes tcp and udp")
        # ("80", ":80": the managers assign one, as `-p 80`; "8000-8010:80": each to 80;
        # "127.0.0.1:5432:5432": at that address of each node that has it)
        ports += with_host_ip(_publish(m.group("pub") or "", m.group("target"), proto, where),
                              _host_ip(m.group("ip") or "", where))
    svc.set("endpoint.ports", ports, path)
    if host:
        svc.set("endpoint.host_ports", host, path)


def _long_port(svc: _Service, m: dict[str, Any], path: str) -> list[dict[str, Any]]:
    known = {"target", "published", "protocol", "mode", "host_ip", "name", "app_protocol"}
    for k in m:
        if k not in known and not k.startswith("x-"):
            raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose Specification)")
    if "target" not in m:
        raise ComposeError(f"{path}.target", "is required")
    target = as_int(m["target"], f"{path}.target")
    _range(str(target), f"{path}.target")
    proto = as_str(m.get("protocol", "tcp"), f"{path}.protocol").lower()
    if proto not in ("tcp", "udp"):
        raise ComposeError(f"{path}.protocol", f"shoal publishes tcp and udp, got {proto!r}")
    mode = as_str(m.get("mode", "ingress"), f"{path}.mode")
    if mode not in ("ingress", "host"):
        raise ComposeError(f"{path}.mode", f"expected ingress or host, got {mode!r}")
    if mode == "host" and m.get("published") in ("", None, 0, "0"):
        raise ComposeError(f"{path}.published", "mode: host needs a published port (shoal "
                           "does not pick one)")
    address = _host_ip(as_str(m.get("host_ip") or "", f"{path}.host_ip"), f"{path}.host_ip")
    # no published port: the managers assign one; a range ("8000-8010", a string in the
    # Compose Specification): every port of it leads to the target, as the short syntax
    # "8000-8010:80" does in docker's swarm CLI (the Specification's "an available port of
    # the range" would need a choice among them that a PortSpec cannot record)
    pub = m.get("published")
    if pub in ("", None):
        published = ""
    elif isinstance(pub, str) and "-" in pub.strip():
        published = pub.strip()
    else:
        published = str(as_int(pub, f"{path}.published"))
    return with_host_ip(_publish(published, str(target), proto, f"{path}.published"), address)


def _host_ip(text: str, path: str) -> str:
    """A port's host address (``127.0.0.1``; ``0.0.0.0``, ``::`` or none: every address) →
    ``host_ip``; an IPv6 one is an error naming ``path`` (the spec checks the rest)."""
    try:
        return host_ip(text)
    except ValueError as exc:
        raise ComposeError(path, str(exc)) from None


def _file_refs(kind: str) -> Handler:
    def handle(svc: _Service, v: Any, path: str) -> None:
        out: list[dict[str, Any]] = []
        for i, item in enumerate(as_list(v, path)):
            where = f"{path}[{i}]"
            if isinstance(item, dict):
                m = as_map(item, where)
                for k in m:
                    if k not in ("source", "target", "uid", "gid", "mode") and \
                            not k.startswith("x-"):
                        raise ComposeError(f"{where}.{k}", "unknown key (not in the Compose "
                                           "Specification)")
                if "source" not in m:
                    raise ComposeError(f"{where}.source", "is required")
                source = as_str(m["source"], f"{where}.source")
            else:
                m, source = {}, as_str(item, where)
            obj = svc.objects[kind].get(source)
            if obj is None:
                raise ComposeError(where, f"undefined {kind} {source!r} (declare it under the "
                                   f"top-level {kind}s:)")
            # docker's convertFileObject: the target defaults to the source's key (a secret's
            # in /run/secrets, a config's at /<key>: the managers write that place, or keep
            # a running service's file where it is, shoal.raft.spec.docker_file_defaults);
            # an absolute target is the path; uid and gid default to 0, as docker's
            ref: dict[str, Any] = {"name": obj.name, "target": source}
            if "target" in m:
                ref["target"] = as_str(m["target"], f"{where}.target")
            if "mode" in m:
                mode = m["mode"]
                ref["mode"] = int(mode, 8) if isinstance(mode, str) and \
                    re.fullmatch(r"0?[0-7]{1,4}", mode) else as_int(mode, f"{where}.mode")
            for key in ("uid", "gid"):  # (strings in the Specification; numbers taken)
                if m.get(key) not in (None, ""):
                    ref[key] = str(as_int(m[key], f"{where}.{key}"))
            out.append(ref)
        svc.set(f"task.container.{kind}s", out, path)
    return handle


def _volumes(svc: _Service, v: Any, path: str) -> None:
    for i, item in enumerate(as_list(v, path)):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            mount = _long_volume(svc, as_map(item, where), where)
        else:
            mount = _short_volume(svc, as_str(item, where), where)
        if mount is not None:
            if mount["type"] == "volume" and mount["source"] and \
                    mount["source"] in svc.volume_drivers:
                driver, opts = svc.volume_drivers[mount["source"]]
                mount.update(volume_driver=driver, volume_opts=opts)
            svc.mounts.append(mount)
            svc.mount_paths.append(where)
            svc.spec_paths["task.container.mounts"] = path


def _named_or_bind(svc: _Service, source: str, path: str) -> tuple[str, str]:
    """(mount type, source) of a volume's source: a path is a bind (relative to the project
    directory), a name must be declared under the top-level volumes."""
    if source.startswith(("/", ".", "~")):
        p = Path(os.path.expanduser(source))
        return "bind", str(p if p.is_absolute() else (svc.project_dir / p).resolve())
    name = svc.volumes.get(source)
    if name is None:
        raise ComposeError(path, f"undefined volume {source!r} (declare it under the "
                           "top-level volumes:)")
    return "volume", name


# a bind's mount propagation (Docker's bind-propagation; short syntax SRC:DST:ro,rslave)
PROPAGATIONS = ("shared", "slave", "private", "rshared", "rslave", "rprivate")


def _short_volume(svc: _Service, text: str, path: str) -> dict[str, Any] | None:
    parts = text.split(":")
    if len(parts) == 1:  # (a path alone: an anonymous volume, made for each task)
        return {"type": "volume", "source": "", "target": text, "readonly": False}
    if len(parts) > 3:
        raise ComposeError(path, f"expected SOURCE:TARGET[:ro|rw], got {text!r}")
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    for opt in options:
        if opt in PROPAGATIONS:
            svc.warn(f"volumes (bind propagation {opt})", f"{NOT_YET}: the bind is private "
                     "(rprivate, Docker's default): mounts made later on the host stay out")
        elif opt not in ("ro", "rw", "z", "Z", "nocopy", "cached", "delegated", "consistent"):
            # (as docker compose: ignored — Zabbix's ":roz" is mounted read-write there too)
            svc.warn(f"volumes (option {opt!r} of {text!r})", "unknown: ignored, as docker "
                     "compose does (not read-only unless ro is given)")
    kind, src = _named_or_bind(svc, source, path)
    out = {"type": kind, "source": src, "target": target, "readonly": "ro" in options}
    if kind == "volume" and "nocopy" in options:
        out["nocopy"] = True
    return out


def _long_volume(svc: _Service, m: dict[str, Any], path: str) -> dict[str, Any] | None:
    known = {"type", "source", "target", "read_only", "bind", "volume", "tmpfs", "consistency",
             "image"}
    for k in m:
        if k not in known and not k.startswith("x-"):
            raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose Specification)")
    kind = as_str(m.get("type", "volume"), f"{path}.type")
    if "target" not in m:
        raise ComposeError(f"{path}.target", "is required")
    target = as_str(m["target"], f"{path}.target")
    readonly = as_bool(m.get("read_only", False), f"{path}.read_only")
    if kind == "tmpfs":
        size = 0
        if "tmpfs" in m:
            t = as_map(m["tmpfs"], f"{path}.tmpfs")
            if "size" in t:
                size = as_size(t["size"], f"{path}.tmpfs.size")
            if "mode" in t:
                svc.warn("volumes.tmpfs.mode", NOT_YET)
        return {"type": "tmpfs", "target": target, "tmpfs_size": size, "readonly": readonly}
    if kind not in ("volume", "bind"):
        svc.warn(f"volumes.type: {kind}", f"{NOT_YET}: not mounted")
        return None
    source = as_str(m.get("source") or "", f"{path}.source")
    if kind == "bind":
        if not source:
            raise ComposeError(f"{path}.source", "a bind mount needs a source (a host path)")
        p = Path(os.path.expanduser(source))
        src = str(p if p.is_absolute() else (svc.project_dir / p).resolve())
    elif source:
        _, src = _named_or_bind(svc, source, f"{path}.source")
    else:  # (no source: an anonymous volume, made for each task)
        src = ""
    out = {"type": kind, "source": src, "target": target, "readonly": readonly}
    if "bind" in m:
        svc.warn("volumes.bind", f"{NOT_YET}: options ignored")
    if "volume" in m:
        opts = as_map(m["volume"], f"{path}.volume")
        if kind == "volume" and "nocopy" in opts:
            out["nocopy"] = as_bool(opts["nocopy"], f"{path}.volume.nocopy")
        if set(opts) - {"nocopy"} or kind != "volume":
            svc.warn("volumes.volume", f"{NOT_YET}: options other than nocopy ignored")
    return out


def _tmpfs(svc: _Service, v: Any, path: str) -> None:
    for i, target in enumerate(as_str_list(v, path)):
        where = f"{path}[{i}]" if isinstance(v, list) else path
        dst, _, opts = target.partition(":")
        size = 0
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key == "size":
                size = as_size(value, where)
            elif opt in ("rw", "exec", "nosuid", "nodev"):
                pass  # (what shoal's tmpfs mounts are: Jitsi's /run:...,exec is honoured)
            else:  # (mode, uid, gid, noexec...: the spec's tmpfs mount holds a size only)
                svc.warn(f"tmpfs ({key})", f"{NOT_YET}: ignored (a tmpfs mount takes size=)")
        svc.mounts.append({"type": "tmpfs", "target": dst, "tmpfs_size": size})
        svc.mount_paths.append(where)
        svc.spec_paths["task.container.mounts"] = path


def _health_test(svc: _Service, v: Any, path: str) -> None:
    svc.health_test_given = True
    if isinstance(v, str):
        svc.set("task.container.healthcheck.command", v, path)
        return
    argv = as_command(v, path)
    if not argv:
        raise ComposeError(path, "expected a command, or [\"NONE\"]")
    head, rest = argv[0], argv[1:]
    if head == "NONE":
        svc.set("task.container.healthcheck.disable", True, path)
    elif head == "CMD" and rest:  # (run without a shell: images without /bin/sh)
        svc.set("task.container.healthcheck.exec", rest, path)
    elif head == "CMD-SHELL" and len(rest) == 1:
        svc.set("task.container.healthcheck.command", rest[0], path)
    else:
        raise ComposeError(path, "expected \"CMD-SHELL command\", [\"CMD\", ARGS...], "
                           f"[\"CMD-SHELL\", \"command\"] or [\"NONE\"], got {argv!r}")


def _expose(svc: _Service, v: Any, path: str) -> None:
    """``expose: ["8081", "9000-9001/udp", 7000]`` → ports the service's VIP serves to other
    tasks (shoal's VIP serves only declared ports, unlike Swarm's, so this is not ignored)."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(as_list(v, path)):
        where = f"{path}[{i}]"
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) \
            else as_str(item, where)
        port, _, proto = text.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp") or not re.fullmatch(r"[0-9]+(-[0-9]+)?", port):
            raise ComposeError(where, f"expected PORT[-PORT][/tcp|udp], got {text!r}")
        out += [{"port": p, "protocol": proto} for p in _range(port, where)]
    svc.set("endpoint.expose", list({(e["port"], e["protocol"]): e for e in out}.values()),
            path)


def _endpoint_mode(svc: _Service, v: Any, path: str) -> None:
    mode = as_str(v, path)
    if mode not in ("vip", "dnsrr"):
        raise ComposeError(path, f"expected vip or dnsrr, got {mode!r}")
    svc.set("endpoint.mode", mode, path)


def _restart(svc: _Service, v: Any, path: str) -> None:
    """The container-level ``restart:`` — used, as by ``docker stack deploy``, only when the
    service has no ``deploy.restart_policy``: no → none, always / unless-stopped → any,
    on-failure[:N] → on-failure with at most N attempts."""
    text = as_str(v, path)
    name, _, count = text.partition(":")
    condition = {"no": "none", "always": "any", "unless-stopped": "any",
                 "on-failure": "on-failure"}.get(name)
    digits = count.isascii() and count.isdigit()
    if condition is None or (count and (name != "on-failure" or not digits)):
        raise ComposeError(path, f"expected no, always, unless-stopped or on-failure[:N], "
                           f"got {text!r}")
    svc.restart = {"condition": condition}
    if count:
        svc.restart["max_attempts"] = int(count)


def _deploy_mode(svc: _Service, v: Any, path: str) -> None:
    mode = as_str(v, path)
    if mode not in ("replicated", "global", "replicated-job", "global-job"):
        raise ComposeError(path, "expected replicated, global, replicated-job or "
                           f"global-job, got {mode!r}")
    svc.set("mode.type", mode, path)


def _preferences(svc: _Service, v: Any, path: str) -> None:
    """``[{spread: node.labels.zone}, ...]`` → the spec's placement preferences."""
    if not isinstance(v, list):
        raise ComposeError(path, f"expected a list of {{spread: node.labels.KEY}}, got {v!r}")
    prefs = []
    for i, p in enumerate(v):
        if not isinstance(p, dict) or set(p) != {"spread"}:
            raise ComposeError(f"{path}[{i}]", f"expected {{spread: node.labels.KEY}}, "
                               f"got {p!r}")
        prefs.append({"spread": as_str(p["spread"], f"{path}[{i}].spread")})
    svc.set("task.placement.preferences", prefs, path)


def _service_networks(svc: _Service, v: Any, path: str) -> None:
    """``networks: [back]`` or ``{back: {aliases: [...]}}`` → the task's networks (the
    stack's names for them); each must be declared under the top-level ``networks:``.
    ``aliases`` → the service's more DNS names on that network (``task.network_aliases``,
    keyed by the network's name in the cluster); the other per-network keys are ignored."""
    if isinstance(v, list):
        keys = {as_str(k, f"{path}[{i}]"): None for i, k in enumerate(v)}
    elif isinstance(v, dict):
        keys = dict(as_map(v, path))
    else:
        raise ComposeError(path, f"expected a list of networks or a mapping, got {v!r}")
    names = []
    aliases: dict[str, list[str]] = {}
    for key, opts in keys.items():
        if key not in svc.networks:
            raise ComposeError(f"{path}.{key}", "not declared under the top-level networks:")
        name = svc.networks[key]
        given: dict[str, Any] = as_map(opts, f"{path}.{key}") if opts else {}
        for k, x in given.items():
            if k == "aliases" and name not in ("host", "none"):
                aliases[name] = as_str_list(x, f"{path}.{key}.aliases") if x else []
            else:  # (the host's network has no names of ours: a network mode, not a network)
                svc.warn(f"networks.{k}", f"{NOT_YET}: ignored (a service is reached by its "
                         "name on each of its networks)")
        names.append(name)
    svc.set("task.networks", names, path)
    if any(aliases.values()):
        svc.set("task.network_aliases", {n: a for n, a in aliases.items() if a}, path)


def _network_mode(svc: _Service, v: Any, path: str) -> None:
    """``network_mode: host | none`` → the task's network mode (beyond docker stack deploy,
    which ignores the key); ``bridge``/``default`` are the cluster network (what a service
    gets anyway); anything else (``service:NAME``, ``container:NAME``: another container's
    namespace) is ignored with a warning, as docker stack deploy ignores it."""
    mode = as_str(v, path)
    if mode in ("host", "none"):
        svc.set("task.network_mode", mode, path)
    elif mode not in ("bridge", "default"):
        svc.warn(f"network_mode: {mode}", "ignored, as by docker stack deploy: the service "
                 "has a network namespace of its own on the stack's networks (containers "
                 "that share one are a pod: x-shoal-sidecars)")


def _logging(svc: _Service, v: Any, path: str) -> None:
    """``logging: {driver, options}``. shoal keeps a task's output in size-rotated files on
    its node (``service logs`` reads them): json-file and local are those, with max-size and
    max-file. Another driver (gelf, syslog, fluentd, awslogs...) or option is warned about
    and left out — the file deploys with its logs in files — where the spec would refuse it
    (``service create --log-driver gelf`` is an error)."""
    section = as_map(v, path)
    for key in section:
        if key not in ("driver", "options") and not key.startswith("x-"):
            raise ComposeError(f"{path}.{key}", "unknown key (not in the Compose Specification)")
    driver = "" if section.get("driver") is None else as_str(section["driver"], f"{path}.driver")
    options = {} if section.get("options") is None else \
        as_labels(section["options"], f"{path}.options")
    if driver and driver not in LOG_DRIVERS:
        svc.warn(f"logging.driver: {driver}", "not supported: the task's output stays in log "
                 "files on its node (`service logs`), the driver's options are ignored")
        return
    if driver:
        svc.set("task.container.log_driver", driver, f"{path}.driver")
    for key in sorted(set(options) - set(LOG_OPTIONS)):
        svc.warn(f"logging.options.{key}", "not supported: ignored (shoal's log files take "
                 "max-size and max-file)")
    kept = {k: val for k, val in options.items() if k in LOG_OPTIONS}
    if kept:
        svc.set("task.container.log_options", kept, f"{path}.options")


def _x_autoscale(svc: _Service, v: Any, path: str) -> None:
    """``x-shoal-autoscale: {min: 2, max: 20, cpu: 60%, memory: 70%, window: 30s, period:
    15s, stabilization: 5m, step: 4, tolerance: 10%}`` (shoal's extension, as
    ``--autoscale``; docker ignores x- keys) → the service's ``mode.autoscale``;
    ``deploy.replicas`` is then the count it starts with."""
    from shoal.cli.flagvalues import parse_autoscale

    keys = as_map(v, path)
    text = ",".join(f"{as_str(k, path)}={_scalar_text(val, f'{path}.{k}')}"
                    for k, val in keys.items())
    try:
        auto = parse_autoscale(text, path)
    except CliError as exc:
        raise ComposeError(path, str(exc).removeprefix(f"{path}: ")) from None
    if auto and "max" not in auto:
        raise ComposeError(f"{path}.max", "is required (the most replicas)")
    svc.set("mode.autoscale", auto, path)


def _scalar_text(v: Any, path: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ComposeError(path, f"expected a number, a percentage or a duration, got {v!r}")
    return str(v)


def _init(svc: _Service, v: Any, path: str) -> None:
    if not as_bool(v, path):
        svc.warn("init: false", f"{NOT_YET}: shoal always runs an init (tini) in a task")


def _extra_hosts(svc: _Service, v: Any, path: str) -> None:
    """``["db:10.0.0.2", "cache=10.0.0.3"]`` or ``{db: 10.0.0.2, api: [10.0.0.4, ::1]}`` →
    the spec's ``NAME:IP`` lines."""
    lines: list[str] = []
    if isinstance(v, dict):
        for name, addrs in v.items():
            lines += [f"{name}:{addr}" for addr in as_str_list(addrs, f"{path}.{name}")]
    else:
        for i, text in enumerate(as_str_list(v, path)):
            name, sep, addr = (text.partition("=") if "=" in text.split(":")[0]
                               else text.partition(":"))
            if not sep:
                raise ComposeError(f"{path}[{i}]", f"expected HOST:IP, got {text!r}")
            lines.append(f"{name}:{addr}")
    svc.set("task.container.extra_hosts", lines, path)


def _ulimits(svc: _Service, v: Any, path: str) -> None:
    """``{nofile: {soft: 1024, hard: 2048}, nproc: 65535}`` → the spec's limits (a single
    number is both)."""
    out: list[dict[str, Any]] = []
    for name, limit in as_map(v, path).items():
        where = f"{path}.{name}"
        if isinstance(limit, dict):
            extra = set(limit) - {"soft", "hard"}
            if extra or not {"soft", "hard"} <= set(limit):
                raise ComposeError(where, "expected a number or {soft: N, hard: N}")
            soft, hard = as_int(limit["soft"], f"{where}.soft"), as_int(limit["hard"],
                                                                        f"{where}.hard")
        else:
            soft = hard = as_int(limit, where)
        out.append({"name": name, "soft": soft, "hard": hard})
    svc.set("task.container.ulimits", out, path)


def _caps(field: str) -> Callable[[_Service, Any, str], None]:
    def handle(svc: _Service, v: Any, path: str) -> None:
        svc.set(f"task.container.{field}", as_str_list(v, path), path)
    return handle


def _restart_condition(svc: _Service, v: Any, path: str) -> None:
    c = as_str(v, path)
    if c not in ("none", "on-failure", "any"):
        raise ComposeError(path, f"expected none, on-failure or any, got {c!r}")
    svc.set("task.restart.condition", c, path)


def _stop_signal(svc: _Service, v: Any, path: str) -> None:
    svc.set("task.container.stop_signal", signal_word(as_str(v, path)), path)


def signal_word(text: str) -> str:
    """A stop signal as the spec stores one: "term" → "SIGTERM"; "15" and "SIGRTMIN+3" as
    they are (the spec judges them)."""
    s = text.strip().upper()
    return s if s.isdigit() or s.startswith("SIG") else f"SIG{s}"


def _x_http(svc: _Service, v: Any, path: str) -> None:
    svc.health_test_given = True
    svc.set("task.container.healthcheck.http", as_str(v, path), path)


def _x_tcp(svc: _Service, v: Any, path: str) -> None:
    svc.health_test_given = True
    svc.set("task.container.healthcheck.tcp", as_int(v, path), path)


def _security_opt(svc: _Service, v: Any, path: str) -> None:
    """Compose's ``security_opt``: ``seccomp:unconfined``/``seccomp=PATH`` (a profile file
    relative to the project's directory, read here as docker run reads it) set the
    container's seccomp; ``no-new-privileges`` is what shoal always does; AppArmor and SELinux
    options are reported as not applied."""
    for i, item in enumerate(as_str_list(v, path)):
        where = f"{path}[{i}]"
        key, sep, value = split_security_opt(item)
        key, value = key.strip(), value.strip()
        if key == "seccomp" and sep and value:
            try:
                setting = seccomp_setting(value, svc.project_dir)
            except (OSError, UnicodeDecodeError) as exc:
                raise ComposeError(where, f"cannot read the seccomp profile {value}: {exc}") \
                    from None
            svc.set("task.container.seccomp", setting, where)
        elif key == "no-new-privileges" and value.lower() in ("", "true"):
            continue  # (shoal sets it for every task)
        elif key == "no-new-privileges":
            svc.warn(_rel(path), "shoal sets no-new-privileges for every task")
        else:
            svc.warn(_rel(path), f"{item!r} is not applied (shoal takes seccomp options "
                     "only: it applies no AppArmor or SELinux profile)")
