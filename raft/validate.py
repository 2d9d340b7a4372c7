"""Deterministic validation of user input (service specs, names, replica counts).

Owns: turning untrusted dicts (from the API) into ServiceSpec records, with a
ValidationError that names the offending field. Used twice: by the API before a
command is proposed (so the user gets a clear error) and inside the state machine
(so a bad command can never wedge Raft). Must not touch: I/O, clocks, randomness.
"""

from __future__ import annotations

import re
from typing import Any

from shoal.raft.errors import ValidationError
from shoal.raft.models import ServiceSpec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_REPLICAS = 10_000
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV = 1000
MAX_GRACE = 3600.0


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
    known = {"name", "command", "replicas", "env", "workdir", "stop_grace_period", "labels"}
    for key in d:
        if key not in known:
            raise ValidationError(f"unknown field {key!r}", str(key))
    name = validate_name(d.get("name"))
    command = d.get("command")
    if not isinstance(command, (list, tuple)) or not command:
        raise ValidationError("command is required (the program to run and its arguments)",
                              "command")
    if not all(isinstance(a, str) for a in command):
        raise ValidationError("command must be a list of strings", "command")
    if not command[0]:
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
    return ServiceSpec(
        name=name,
        command=tuple(command),
        replicas=replicas,
        env=dict(env),
        workdir=workdir,
        stop_grace_period=float(grace),
        labels=dict(labels),
    )
