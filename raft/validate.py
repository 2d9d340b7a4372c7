"""Deterministic validation of user input (service specs, names, replica counts) and of a
node's description of itself (``validate_description``).

Owns: turning untrusted values (from the API, or commands in the log) into typed records
with a ValidationError that names the offending field by its path in the spec
(``task.placement.constraints[1]``). The rules themselves are declared with the spec
(shoal.raft.spec); this module runs them (``msgspec.convert``, strict types) and translates
msgspec's errors. Used twice: by the API before a command is proposed (so the user gets a
clear error) and inside the state machine (so a bad command can never wedge Raft). Must not
touch: I/O, clocks, randomness.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from shoal.raft import schema
from shoal.raft.errors import ValidationError
from shoal.raft.spec import (
    MAX_CONSTRAINTS,
    MAX_REPLICAS,
    OBJECT_NAME_RE,
    Constraint,
    FileRef,
    ServiceSpec,
    SpecError,
)
from shoal.raft.spec import parse_constraint as _parse_constraint

# An object id (node, network, secret, config): what the proposing manager generated.
ID_RE = re.compile(r"^[a-z0-9]{1,64}$")
# A node's architecture as ``uname -m`` gives it (x86_64, aarch64, armv7l, ppc64le, s390x)
ARCH_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
# Bounds of a described node: 1 EiB of memory, 2**20 CPUs (a typo's figure, not a host's)
MAX_MEMORY = 1 << 60
MAX_CPUS = float(1 << 20)
_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def validate_replicas(value: Any, field: str = "replicas") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value.strip())
        else:
            raise ValidationError(f"{field} must be a whole number >= 0, got {value!r}", field)
    if value < 0 or value > MAX_REPLICAS:
        raise ValidationError(f"{field} must be between 0 and {MAX_REPLICAS}, got {value}", field)
    return value


def valid_arch(value: Any) -> bool:
    return isinstance(value, str) and bool(ARCH_RE.match(value))


def validate_description(cmd: Any) -> dict[str, Any]:
    """A node's description of itself (the ``node_describe`` command's fields ``arch``,
    ``memory_bytes``, ``cpus``) → those fields checked, or ValidationError naming the first
    bad one. The same rules on the manager that takes a worker's report and in the state
    machine."""
    if not isinstance(cmd, dict):
        raise ValidationError("a node description must be an object", "cmd")
    arch, memory, cpus = cmd.get("arch"), cmd.get("memory_bytes"), cmd.get("cpus")
    if not valid_arch(arch):
        raise ValidationError(f"arch must be the node's architecture as uname -m gives it "
                              f"(1-32 of A-Z a-z 0-9 _ . -), got {_shown(arch)}", "arch")
    if isinstance(memory, bool) or not isinstance(memory, int) or \
            not 0 <= memory <= MAX_MEMORY:
        raise ValidationError(f"memory_bytes must be a whole number of bytes from 0 to "
                              f"{MAX_MEMORY}, got {_shown(memory)}", "memory_bytes")
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or \
            not 0 <= cpus <= MAX_CPUS:  # (NaN fails the comparison, inf the bound)
        raise ValidationError(f"cpus must be a finite number from 0 to {MAX_CPUS:g}, got "
                              f"{_shown(cpus)}", "cpus")
    return {"arch": arch, "memory_bytes": memory, "cpus": float(cpus)}


def validate_spec(d: Any) -> ServiceSpec:
    """Untrusted dict → ServiceSpec, or ValidationError naming the field by its path. A
    schema-1 (flat) spec is accepted and upgraded (old clients, old log entries)."""
    if not isinstance(d, dict):
        raise ValidationError("service spec must be an object", "spec")
    if schema.is_legacy_spec(d):
        d = schema.upgrade_spec(d)
    try:
        return msgspec.convert(d, ServiceSpec, strict=True)
    except msgspec.ValidationError as exc:
        err = spec_error(exc)
        found, value = _value_at(d, err.field)
        if found and "expected" in err.message and not isinstance(value, (dict, list)):
            got = f"got {_shown(value)}"
            # (a function as the replacement: the value is user input, never a template)
            msg, n = re.subn(r"got `[\w ]+`", lambda _m: got, err.message)
            err = ValidationError(msg if n or " got " in msg else f"{msg}, {got}", err.field)
        raise err from None


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows it: its repr, cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _value_at(d: Any, path: str) -> tuple[bool, Any]:
    """The value at ``task.container.mounts[1].source`` in ``d``, if there is one."""
    node = d
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return False, None
            node = node[i]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def spec_error(exc: msgspec.ValidationError) -> ValidationError:
    """msgspec's ``"Expected `int` >= 0 - at `$.task.resources.limits.pids`"`` (or a
    SpecError's ``"sub.field: message - at `$.task`"``) → ValidationError(message, field)
    with the dotted path of the field: ``task.resources.limits.pids: expected `int` >= 0``."""
    m = _AT_RE.match(str(exc))
    msg, path = (m.group("msg"), m.group("path") or "") if m else (str(exc), "")
    path = path.lstrip(".")
    sub, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[a-z_][a-z0-9_.\[\]]*", sub):  # a SpecError names a sub-field
        path = f"{path}.{sub}" if path else sub
        msg = rest
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", msg)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return ValidationError(f"unknown field {path!r}", path)
    missing = re.fullmatch(r"Object missing required field `(.+)`", msg)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return ValidationError(f"{path} is required", path)
    if "matching regex" in msg:
        from shoal.raft.spec import by_path
        decl = by_path().get(path.replace(".[", "["))
        from shoal.raft.podspec import sidecar_help
        help_ = decl.help if decl is not None else sidecar_help(path.replace(".[", "["))
        msg = f"invalid value: {help_}" if help_ else "invalid value"
    if msg[:1].isupper() and not msg[:2].isupper():
        msg = msg[0].lower() + msg[1:]
    field = path.replace(".[", "[") or "spec"
    return ValidationError(f"{field}: {msg}", field)


def validate_object_name(name: Any, kind: str) -> str:
    """Name of a secret or config: 1-64 letters, digits, '.', '_' or '-'."""
    if not isinstance(name, str) or not OBJECT_NAME_RE.match(name):
        raise ValidationError(f"{kind} name {name!r} is invalid: use 1-64 letters, digits, "
                              "'.', '_' and '-', starting and ending with a letter or digit",
                              "name")
    return name


def validate_file_refs(refs: Any, field: str) -> tuple[FileRef, ...]:
    """``secrets``/``configs`` of a spec: ``[{name, target, uid, gid, mode}]``; targets are
    file names or absolute paths (shoal.raft.spec.FileRef), one file per path; mode
    0-0o777."""
    if refs is None:
        return ()
    try:
        out = msgspec.convert(refs, tuple[FileRef, ...], strict=True)
    except msgspec.ValidationError as exc:
        err = spec_error(exc)
        where = f"{field}{err.field}" if err.field.startswith("[") else field
        raise ValidationError(err.message.replace(err.field, where, 1), where) from None
    files = [r.file_path(field.removesuffix("s")) for r in out]
    if len(set(files)) != len(files):
        raise ValidationError(f"two {field} use the same target file", field)
    return out


def parse_constraint(expr: Any, field: str = "constraint") -> Constraint:
    """``"node.labels.zone == b"`` → Constraint, or ValidationError naming ``field``
    (the rules: shoal.raft.spec.parse_constraint)."""
    try:
        return _parse_constraint(expr, field)
    except SpecError as exc:
        raise ValidationError(str(exc), field) from None


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
