"""Deterministic validation of user input (service specs, names, replica counts).

Owns: turning untrusted dicts (from the API) into ServiceSpec records, with a
ValidationError that names the offending field (``constraints[1]``), and parsing placement
constraints (``parse_constraint``; the scheduler matches them against nodes). Used twice:
by the API before a command is proposed (so the user gets a clear error) and inside the
state machine (so a bad command can never wedge Raft). Must not touch: I/O, clocks, randomness.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from shoal.raft.errors import ValidationError
from shoal.raft.models import Constraint, FileRef, Mount, PortSpec, ServiceSpec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9._-]{1,128})?$")
_USER_PART = r"([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})"
USER_RE = re.compile(rf"^{_USER_PART}(:{_USER_PART})?$")
SIGNALS = {"SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGWINCH"}
MAX_REPLICAS = 10_000
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV = 1000
MAX_GRACE = 3600.0
# secret and config names (Docker's rule) and the file names they appear under in a task
OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
MAX_FILE_REFS = 100
# placement constraints (Swarm's syntax and character sets)
CONSTRAINT_KEYS = ("node.id", "node.hostname", "node.role", "node.ip", "node.platform.os")
LABEL_PREFIX = "node.labels."
CONSTRAINT_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]+$")
CONSTRAINT_VALUE_RE = re.compile(r"^[A-Za-z0-9:_\s.*()?+\[\]\\^$|/-]+$")
MAX_CONSTRAINTS = 64
MAX_CONSTRAINT_LEN = 512


def validate_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{field} is required", field)
    if not NAME_RE.match(name):
        raise ValidationError(
            f"{field} {name!r} is invalid: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit",
            field,
        )
    return name


def validate_replicas(value: Any, field: str = "replicas") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        else:
            raise ValidationError(f"{field} must be a whole number >= 0, got {value!r}", field)
    if value < 0 or value > MAX_REPLICAS:
        raise ValidationError(f"{field} must be between 0 and {MAX_REPLICAS}, got {value}", field)
    return value


def validate_spec(d: Any) -> ServiceSpec:
    """Untrusted dict → ServiceSpec, or ValidationError naming the field."""
    if not isinstance(d, dict):
        raise ValidationError("service spec must be an object", "spec")
    known = {"name", "command", "replicas", "env", "workdir", "stop_grace_period", "labels",
             "image", "user", "stop_signal", "limit_memory", "limit_cpu", "limit_pids",
             "reserve_memory", "reserve_cpu", "mounts", "restart_condition", "restart_delay",
             "restart_max_attempts", "restart_window", "update_parallelism", "update_delay",
             "force_update", "secrets", "configs", "ports", "lb_algorithm", "constraints"}
    for key in d:
        if key not in known:
            raise ValidationError(f"unknown field {key!r}", str(key))
    name = validate_name(d.get("name"))
    command = d.get("command")
    if command is None and d.get("image"):
        command = []  # the image's ENTRYPOINT/CMD
    if not isinstance(command, (list, tuple)) or (not command and not d.get("image")):
        raise ValidationError("command is required (the program to run and its arguments)",
                              "command")
    if not all(isinstance(a, str) for a in command):
        raise ValidationError("command must be a list of strings", "command")
    if command and not command[0]:
        raise ValidationError("command must not start with an empty string", "command")
    if sum(len(a) for a in command) > MAX_COMMAND_BYTES:
        raise ValidationError("command is too long", "command")
    replicas = validate_replicas(d.get("replicas", 1))
    env = d.get("env", {}) or {}
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise ValidationError("env must be a map of NAME to value", "env")
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY_RE.match(k):
            raise ValidationError(f"env name {k!r} is invalid (letters, digits, '_')", "env")
        if not isinstance(v, str) or "\0" in v:
            raise ValidationError(f"env value of {k} must be a string without NUL", "env")
    workdir = d.get("workdir", "") or ""
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")) or "\0" in workdir:
        raise ValidationError(f"workdir must be an absolute path, got {workdir!r}", "workdir")
    grace = d.get("stop_grace_period", 10.0)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or \
            not 0 <= grace <= MAX_GRACE:
        raise ValidationError(
            f"stop_grace_period must be a number of seconds between 0 and {MAX_GRACE:g}",
            "stop_grace_period",
        )
    labels = d.get("labels", {}) or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValidationError("labels must be a map of strings", "labels")
    image = d.get("image", "") or ""
    if not isinstance(image, str) or (image and not IMAGE_RE.match(image)):
        raise ValidationError(f"image {image!r} is invalid (NAME[:TAG], lower-case)", "image")
    user = d.get("user", "") or ""
    if not isinstance(user, str) or (user and not USER_RE.match(user)):
        raise ValidationError(f"user {user!r} is invalid (NAME, UID or UID:GID)", "user")
    stop_signal = d.get("stop_signal", "SIGTERM") or "SIGTERM"
    if not isinstance(stop_signal, str) or stop_signal.upper() not in SIGNALS:
        raise ValidationError(f"stop_signal {stop_signal!r} is not a known signal", "stop_signal")
    restart_condition = d.get("restart_condition", "any") or "any"
    if restart_condition not in ("none", "on-failure", "any"):
        raise ValidationError("restart_condition must be none, on-failure or any",
                              "restart_condition")
    return ServiceSpec(
        name=name,
        command=tuple(command),
        replicas=replicas,
        env=dict(env),
        workdir=workdir,
        stop_grace_period=float(grace),
        labels=dict(labels),
        image=image,
        user=user,
        stop_signal=stop_signal.upper(),
        limit_memory=_int(d, "limit_memory", 0, 1 << 50),
        limit_cpu=_num(d, "limit_cpu", 0.0, 1024.0),
        limit_pids=_int(d, "limit_pids", 0, 1 << 22),
        reserve_memory=_int(d, "reserve_memory", 0, 1 << 50),
        reserve_cpu=_num(d, "reserve_cpu", 0.0, 1024.0),
        mounts=tuple(_mount(m, i) for i, m in enumerate(_list(d, "mounts"))),
        restart_condition=restart_condition,
        restart_delay=_num(d, "restart_delay", 0.0, 86400.0, default=1.0),
        restart_max_attempts=_int(d, "restart_max_attempts", 0, 1_000_000),
        restart_window=_num(d, "restart_window", 0.0, 86400.0 * 365),
        update_parallelism=_int(d, "update_parallelism", 0, MAX_REPLICAS, default=1),
        update_delay=_num(d, "update_delay", 0.0, 86400.0),
        force_update=_int(d, "force_update", 0, 1 << 31),
        ports=_ports(_list(d, "ports")),
        lb_algorithm=_choice(d, "lb_algorithm", ("round-robin", "least-conn"), "round-robin"),
        secrets=validate_file_refs(d.get("secrets"), "secrets"),
        configs=validate_file_refs(d.get("configs"), "configs"),
        constraints=validate_constraints(d.get("constraints")),
    )


def _int(d: dict[str, Any], key: str, lo: int, hi: int, default: int = 0) -> int:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError(f"{key} must be a whole number between {lo} and {hi}, got {v!r}",
                              key)
    return v


def _num(d: dict[str, Any], key: str, lo: float, hi: float, default: float = 0.0) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValidationError(f"{key} must be a number between {lo:g} and {hi:g}, got {v!r}",
                              key)
    return float(v)


RESERVED_PORTS = {2377: "the node API", 2378: "Raft", 7946: "gossip"}


def _ports(items: list[Any]) -> tuple[PortSpec, ...]:
    out: list[PortSpec] = []
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(items):
        field = f"ports[{i}]"
        if not isinstance(p, dict):
            raise ValidationError(f"{field} must be an object", field)
        proto = p.get("protocol", "tcp") or "tcp"
        if proto not in ("tcp", "udp"):
            raise ValidationError(f"{field}.protocol must be tcp or udp, got {proto!r}",
                                  f"{field}.protocol")
        ports = []
        for key in ("published", "target"):
            v = p.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise ValidationError(f"{field}.{key} must be a port between 1 and 65535, "
                                      f"got {v!r}", f"{field}.{key}")
            ports.append(v)
        published, target = ports
        if published in RESERVED_PORTS:
            raise ValidationError(f"port {published} is used by shoal itself "
                                  f"({RESERVED_PORTS[published]})", f"{field}.published")
        if (published, proto) in seen:
            raise ValidationError(f"port {published}/{proto} is published twice",
                                  f"{field}.published")
        seen.add((published, proto))
        out.append(PortSpec(published=published, target=target, protocol=proto))
    return tuple(out)


def _choice(d: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    v = d.get(key, default) or default
    if v not in allowed:
        raise ValidationError(f"{key} must be one of {', '.join(allowed)}, got {v!r}", key)
    return str(v)


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key) or []
    if not isinstance(v, (list, tuple)):
        raise ValidationError(f"{key} must be a list", key)
    return list(v)


def _mount(m: Any, i: int) -> Mount:
    field = f"mounts[{i}]"
    if not isinstance(m, dict):
        raise ValidationError(f"{field} must be an object", field)
    kind = m.get("type")
    if kind not in ("bind", "volume", "tmpfs"):
        raise ValidationError(f"{field}.type must be bind, volume or tmpfs, got {kind!r}",
                              f"{field}.type")
    target = m.get("target")
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target or \
            ".." in target.split("/"):
        raise ValidationError(f"{field}.target must be an absolute path inside the task",
                              f"{field}.target")
    source = m.get("source", "") or ""
    if not isinstance(source, str):
        raise ValidationError(f"{field}.source must be a string", f"{field}.source")
    if kind == "bind" and (not source.startswith("/") or ".." in source.split("/")):
        raise ValidationError(f"{field}.source of a bind mount must be an absolute host path",
                              f"{field}.source")
    if kind == "volume" and not NAME_RE.match(source):
        raise ValidationError(f"{field}.source must name a volume (lower-case letters, digits, "
                              "'-')", f"{field}.source")
    if kind == "tmpfs" and source:
        raise ValidationError(f"{field}: a tmpfs mount takes no source", f"{field}.source")
    size = m.get("tmpfs_size", 0) or 0
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValidationError(f"{field}.tmpfs_size must be a byte count >= 0",
                              f"{field}.tmpfs_size")
    return Mount(type=kind, target=target, source=source, readonly=bool(m.get("readonly")),
                 tmpfs_size=size)


def validate_object_name(name: Any, kind: str) -> str:
    """Name of a secret or config: 1-64 letters, digits, '.', '_' or '-'."""
    if not isinstance(name, str) or not OBJECT_NAME_RE.match(name):
        raise ValidationError(f"{kind} name {name!r} is invalid: use 1-64 letters, digits, "
                              "'.', '_' and '-', starting and ending with a letter or digit",
                              "name")
    return name


def validate_file_refs(refs: Any, field: str) -> tuple[FileRef, ...]:
    """``secrets``/``configs`` of a spec: ``[{name, target, mode}]``; targets are plain file
    names (the task sees /run/secrets/<target>), unique per kind; mode 0-0o777."""
    if refs is None:
        return ()
    if not isinstance(refs, (list, tuple)) or len(refs) > MAX_FILE_REFS:
        raise ValidationError(f"{field} must be a list of at most {MAX_FILE_REFS} references",
                              field)
    out: list[FileRef] = []
    for i, r in enumerate(refs):
        where = f"{field}[{i}]"
        if not isinstance(r, dict) or set(r) - {"name", "target", "mode"}:
            raise ValidationError(f"{where} must be an object with name, target, mode", where)
        name = validate_object_name(r.get("name"), field.rstrip("s"))
        target = r.get("target") or ""
        if not isinstance(target, str) or (target and (
                not FILE_NAME_RE.match(target) or target in (".", ".."))):
            raise ValidationError(f"{where}.target must be a file name (no '/'), got "
                                  f"{target!r}", f"{where}.target")
        mode = r.get("mode", 0o444)
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValidationError(f"{where}.mode must be a file mode between 0 and 0777",
                                  f"{where}.mode")
        out.append(FileRef(name=name, target=target, mode=mode))
    files = [r.file_name for r in out]
    if len(set(files)) != len(files):
        raise ValidationError(f"two {field} use the same target file name", field)
    return tuple(out)


def parse_constraint(expr: Any, field: str = "constraint") -> Constraint:
    """``"node.labels.zone == b"`` → Constraint, or ValidationError naming ``field``.

    Swarm's syntax: ``KEY==VALUE`` or ``KEY!=VALUE`` (spaces around the operator allowed),
    KEY one of node.id, node.hostname, node.role (manager|worker), node.ip (an address or a
    CIDR), node.platform.os, node.labels.NAME. Keys other than the label name are
    case-insensitive. node.platform.arch and engine.labels are refused: shoal nodes do not
    report them, and a constraint that can never match must not pass silently."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValidationError(f"{field}: a constraint must be a non-empty string such as "
                              "node.labels.zone==b", field)
    if len(expr) > MAX_CONSTRAINT_LEN:
        raise ValidationError(f"{field}: constraint is longer than {MAX_CONSTRAINT_LEN} "
                              "characters", field)
    found = [(i, op) for op in ("==", "!=") if (i := expr.find(op)) >= 0]
    if not found:
        raise ValidationError(f"{field}: {expr!r} has no operator: use KEY==VALUE or "
                              "KEY!=VALUE (e.g. node.labels.zone==b)", field)
    at, op = min(found)
    key, value = expr[:at].strip(), expr[at + 2:].strip()
    if not key or not CONSTRAINT_KEY_RE.match(key):
        raise ValidationError(f"{field}: {expr!r}: invalid key {key!r}", field)
    lowered = key.lower()
    if lowered.startswith(LABEL_PREFIX) and len(key) > len(LABEL_PREFIX):
        key = LABEL_PREFIX + key[len(LABEL_PREFIX):]
    elif lowered in CONSTRAINT_KEYS:
        key = lowered
    else:
        why = ""
        if lowered.rstrip(".") == "node.labels":
            why = " (name the label: node.labels.NAME)"
        elif lowered == "node.platform.arch":
            why = " (shoal nodes do not report their architecture)"
        elif lowered.startswith("engine.labels"):
            why = " (shoal has no engine labels: use node labels, `shoal node update " \
                  "--label-add`)"
        raise ValidationError(f"{field}: {expr!r}: unsupported key {key!r}{why}: use "
                              f"{', '.join(CONSTRAINT_KEYS)} or node.labels.NAME", field)
    if not value or not CONSTRAINT_VALUE_RE.match(value):
        raise ValidationError(f"{field}: {expr!r}: invalid value {value!r} (letters, digits "
                              "and : _ . - / are allowed; no '=' or '!')", field)
    if key == "node.role":
        value = value.lower()
        if value not in ("manager", "worker"):
            raise ValidationError(f"{field}: {expr!r}: node.role is manager or worker", field)
    if key == "node.ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValidationError(f"{field}: {expr!r}: node.ip takes an address or a CIDR "
                                  "(e.g. 10.0.0.0/24)", field) from None
    return Constraint(key=key, op=op, value=value)


def validate_constraints(items: Any, field: str = "constraints") -> tuple[str, ...]:
    """A spec's ``constraints``: a list of expressions → their canonical texts
    (``node.labels.zone==b``), duplicates dropped, order kept. Errors name the entry
    (``constraints[1]``)."""
    if items is None:
        return ()
    if not isinstance(items, (list, tuple)) or len(items) > MAX_CONSTRAINTS:
        raise ValidationError(f"{field} must be a list of at most {MAX_CONSTRAINTS} "
                              "expressions such as node.labels.zone==b", field)
    out: list[str] = []
    for i, expr in enumerate(items):
        text = str(parse_constraint(expr, f"{field}[{i}]"))
        if text not in out:
            out.append(text)
    return tuple(out)
