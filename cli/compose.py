"""Compose files → what `shoal stack deploy` creates: service specs, secrets, configs.

Owns: reading Compose files (YAML through PyYAML's safe loader, with YAML 1.2 scalars: ``80:80``
stays a string, ``yes`` is not a boolean), merging override files, variable interpolation
(``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
``${VAR?error}``, ``${VAR:+alt}``, ``$$``) from the environment and the ``.env`` file beside the
first file (the environment wins, as in Compose; Swarm ignores ``.env``: moby/moby#29133), and
the translation of the Compose Specification, as Swarm reads it, into ``ServiceSpec`` records
validated by the same code as the API (``shoal.raft.validate.validate_spec``). Pure functions of
the files and an environment: no API calls, no output. Must not touch: the cluster (that is
shoal.cli.stack), the spec's declarations (shoal.raft.spec).

Every service key (dotted, under ``services.NAME``) has one entry in ``KEYS``: a handler that
writes the spec, a section whose sub-keys are looked up in the same table, or a rule that
warns — ``IGNORED`` (does not apply to a stack, Swarm ignores it too) or ``NOT_YET`` (Swarm
reads it; shoal's spec has no field for it yet). Wiring a new spec field is replacing its
``NOT_YET`` entry with a handler. A key outside the Compose Specification is an error, ``x-*``
extension keys are skipped. Each warning names the key once, with the services that use it.

Names, as Swarm's: services ``STACK_SERVICE``, secrets/configs/volumes declared in the file
``STACK_KEY`` (unless ``external`` or ``name:``); everything carries the label
``com.docker.stack.namespace=STACK``.

Errors (drawn in shoal.cli.errors): ``ComposeError`` (a CliError) when the file cannot be read,
parsed, interpolated or translated; the message starts with the path of the offending value
(``services.web.deploy.replicas: expected an integer, got 'three'``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shoal.cli.errors import CliError, ComposeError
from shoal.cli.specflags import parse_duration, parse_size
from shoal.raft.errors import ValidationError
from shoal.raft.spec import ServiceSpec
from shoal.raft.validate import validate_spec

# The label Swarm puts on everything a stack owns; node/mesh.py reads the same string to
# resolve a stack's short service names (a test checks they agree).
STACK_LABEL = "com.docker.stack.namespace"
# A stack's name: lower-case letters, digits and '-' (no '_': NAME_SERVICE must split at the
# first '_'); short enough that NAME_SERVICE stays a valid service name.
STACK_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

IGNORED = "ignored: it does not apply to a stack (Swarm ignores it too)"
NOT_YET = "not supported yet"


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class FileObject:
    """A secret or config of the stack: created from ``data`` unless ``external``."""

    kind: str  # "secret" | "config"
    key: str  # its key in the file (what services name)
    name: str  # its name in the cluster
    data: bytes | None  # None when external
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def external(self) -> bool:
        return self.data is None


@dataclass
class NetworkObject:
    """A network of the stack (top-level ``networks:``): created unless ``external``."""

    key: str  # its key in the file (what services name)
    name: str  # its name in the cluster
    external: bool = False
    internal: bool = False
    attachable: bool = False
    subnet: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    """A translated Compose file: what a deploy makes the cluster hold."""

    name: str
    services: list[ServiceSpec]
    secrets: list[FileObject]
    configs: list[FileObject]
    warnings: list[str]
    networks: list[NetworkObject] = field(default_factory=list)


# ----------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars (as Compose's Go parser):
    no sexagesimal ints (``80:80`` is a port mapping, not 4880), booleans only
    true/false, no implicit timestamps."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0[0-7_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """One Compose document → its top-level mapping, or ComposeError naming ``source``."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # (a SafeLoader subclass: no arbitrary objects)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ComposeError(source, f"invalid YAML{where}: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ComposeError(source, "a Compose file is a mapping (services: ...)")
    return doc


# ----------------------------------------------------------------------------- environment

_ENV_LINE_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$")


def parse_env_file(text: str, source: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, ``export``, single or double quotes,
    `` #`` comments after an unquoted value) → a map. Values are not interpolated."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ENV_LINE_RE.match(line)
        if m is None:
            raise ComposeError(f"{source}:{n}", f"expected KEY=VALUE, got {line.strip()!r}")
        key, value = m.group(1), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if m.group(2).strip()[0] == '"':
                value = value.replace("\\n", "\n").replace('\\"', '"')
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
        out[key] = value
    return out


def read_env_file(path: Path, source: str) -> dict[str, str]:
    try:
        return parse_env_file(path.read_text(), source)
    except OSError as exc:
        raise ComposeError(source, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ComposeError(source, f"{path} is not UTF-8 text") from None


# ----------------------------------------------------------------------------- interpolation

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Interpolator:
    def __init__(self, env: Mapping[str, str], warn: Callable[[str], None]) -> None:
        self.env = env
        self.warn = warn

    def text(self, s: str, path: str) -> str:
        out, _ = self._scan(s, 0, path, None)
        return out

    def _scan(self, s: str, i: int, path: str, stop: str | None) -> tuple[str, int]:
        """Interpolate ``s`` from ``i`` up to ``stop`` (a closing brace of a nested default)
        or the end; returns (text, index after it)."""
        out: list[str] = []
        while i < len(s):
            c = s[i]
            if stop is not None and c == stop:
                return "".join(out), i
            if c != "$":
                out.append(c)
                i += 1
                continue
            nxt = s[i + 1] if i + 1 < len(s) else ""
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt == "{":
                value, i = self._braced(s, i + 2, path)
                out.append(value)
            elif m := _NAME_RE.match(s, i + 1):
                out.append(self._get(m.group(0), path))
                i = m.end()
            else:
                raise ComposeError(path, f"invalid interpolation at {s[i:i + 10]!r} "
                                   "(use $$ for a literal $)")
        if stop is not None:
            raise ComposeError(path, f"unterminated ${{...}} in {s!r}")
        return "".join(out), i

    def _braced(self, s: str, i: int, path: str) -> tuple[str, int]:
        m = _NAME_RE.match(s, i)
        if m is None:
            raise ComposeError(path, f"invalid interpolation in {s!r}: ${{ must be followed "
                               "by a variable name")
        name, i = m.group(0), m.end()
        if s.startswith("}", i):
            return self._get(name, path), i + 1
        op = next((o for o in (":-", ":?", ":+", "-", "?", "+") if s.startswith(o, i)), None)
        if op is None:
            raise ComposeError(path, f"invalid interpolation in {s!r} after ${{{name}")
        arg, i = self._scan(s, i + len(op), path, "}")
        value = self.env.get(name)
        empty_counts = op.startswith(":")
        unset = value is None or (empty_counts and value == "")
        if op in (":-", "-"):
            return (arg if unset else str(value)), i + 1
        if op in (":+", "+"):
            return ("" if unset else arg), i + 1
        if unset:
            raise ComposeError(path, f"required variable {name} is "
                               f"{'missing a value' if value is None else 'empty'}"
                               + (f": {arg}" if arg else ""))
        return str(value), i + 1

    def _get(self, name: str, path: str) -> str:
        value = self.env.get(name)
        if value is None:
            self.warn(f"the {name} variable is not set: it is replaced by an empty string "
                      f"(at {path})")
            return ""
        return value

    def walk(self, node: Any, path: str) -> Any:
        if isinstance(node, str):
            return self.text(node, path)
        if isinstance(node, dict):
            return {k: self.walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node


def interpolate(doc: Any, env: Mapping[str, str],
                warnings: list[str] | None = None) -> Any:
    """``doc`` with every string value interpolated from ``env`` (keys are not)."""
    sink = warnings if warnings is not None else []
    return _Interpolator(env, sink.append).walk(doc, "")


# ----------------------------------------------------------------------------- merging

# service keys whose list items an override adds to (same item replaced) instead of replacing
_MERGED_LISTS = {"ports", "secrets", "configs", "volumes", "env_file", "cap_add", "cap_drop",
                 "extra_hosts", "dns", "dns_search", "expose", "tmpfs"}
_MAPPED_LISTS = {"environment", "labels"}  # KEY=VALUE lists that merge as maps


def _as_map(value: Any) -> Any:
    if isinstance(value, list):
        out: dict[str, Any] = {}
        for item in value:
            if isinstance(item, str):
                k, sep, v = item.partition("=")
                out[k] = v if sep else None
            else:
                return value  # not a KEY=VALUE list: left for the translation to refuse
        return out
    return value


def merge(base: Any, over: Any, key: str = "", depth: int = 0) -> Any:
    """Compose's override rules, simplified: maps merge recursively, ``environment`` and
    ``labels`` merge as maps, ports/secrets/configs/volumes/... lists are concatenated
    without duplicates, anything else is replaced."""
    if depth == 3 and key in _MAPPED_LISTS:  # (services.NAME.environment)
        base, over = _as_map(base), _as_map(over)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v, str(k), depth + 1) if k in base else v
        return out
    if depth == 3 and key in _MERGED_LISTS and isinstance(base, list) \
            and isinstance(over, list):
        return base + [v for v in over if v not in base]
    return over


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
            required = as_bool(m.get("required", True), f"{where}.required")
            item = m.get("path")
        file = svc.project_dir / as_str(item, where)
        if not required and not file.exists():
            continue
        svc.env_files.update(read_env_file(file, where))


_PORT_RE = re.compile(r"^(?:(?P<ip>\[[^\]]*\]|[^:\[\]]*):)??(?:(?P<pub>[0-9]*(?:-[0-9]+)?):)?"
                      r"(?P<target>[0-9]+(?:-[0-9]+)?)(?:/(?P<proto>[a-z]+))?$")


def _range(text: str, path: str) -> list[int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not (1 <= a <= b <= 65535):
        raise ComposeError(path, f"invalid port or range {text!r} (1-65535)")
    return list(range(a, b + 1))


def _ports(svc: _Service, v: Any, path: str) -> None:
    ports: list[dict[str, Any]] = []
    for i, item in enumerate(as_list(v, path)):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            ports += _long_port(svc, as_map(item, where), where)
            continue
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) \
            else as_str(item, where)
        m = _PORT_RE.match(text)
        if m is None:
            raise ComposeError(where, f"expected [[IP:]PUBLISHED:]TARGET[/tcp|udp], got "
                               f"{text!r}")
        proto = m.group("proto") or "tcp"
        if proto not in ("tcp", "udp"):
            raise ComposeError(where, f"protocol {proto!r}: shoal publishes tcp and udp")
        if m.group("ip"):
            svc.warn("ports (host IP)", f"{NOT_YET}: published on every address of every "
                     "node (the routing mesh)")
        targets = _range(m.group("target"), where)
        if not m.group("pub"):
            svc.warn("ports (no published port)", f"{NOT_YET}: shoal does not pick a port; "
                     "that port is not published")
            continue
        published = _range(m.group("pub"), where)
        if len(published) != len(targets):
            raise ComposeError(where, f"{text!r}: the published and target ranges must be "
                               "of the same length")
        ports += [{"published": p, "target": t, "protocol": proto}
                  for p, t in zip(published, targets, strict=True)]
    svc.set("endpoint.ports", ports, path)


def _long_port(svc: _Service, m: dict[str, Any], path: str) -> list[dict[str, Any]]:
    known = {"target", "published", "protocol", "mode", "host_ip", "name", "app_protocol"}
    for k in m:
        if k not in known and not k.startswith("x-"):
            raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose Specification)")
    if "target" not in m:
        raise ComposeError(f"{path}.target", "is required")
    target = as_int(m["target"], f"{path}.target")
    proto = as_str(m.get("protocol", "tcp"), f"{path}.protocol").lower()
    if proto not in ("tcp", "udp"):
        raise ComposeError(f"{path}.protocol", f"shoal publishes tcp and udp, got {proto!r}")
    mode = as_str(m.get("mode", "ingress"), f"{path}.mode")
    if mode not in ("ingress", "host"):
        raise ComposeError(f"{path}.mode", f"expected ingress or host, got {mode!r}")
    if mode == "host":
        svc.warn("ports.mode: host", f"{NOT_YET}: published through the routing mesh "
                 "(ingress) instead")
    if m.get("host_ip"):
        svc.warn("ports.host_ip", f"{NOT_YET}: published on every address of every node")
    if "published" not in m or m["published"] in ("", None):
        svc.warn("ports (no published port)", f"{NOT_YET}: shoal does not pick a port; that "
                 "port is not published")
        return []
    pub = m["published"]
    published = _range(pub, f"{path}.published") if isinstance(pub, str) and "-" in pub \
        else [as_int(pub, f"{path}.published")]
    if len(published) != 1:
        raise ComposeError(f"{path}.published", "a range needs a target range (short syntax)")
    return [{"published": published[0], "target": target, "protocol": proto}]


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
            ref: dict[str, Any] = {"name": obj.name, "target": source}
            if "target" in m:
                target = as_str(m["target"], f"{where}.target")
                prefix = "/run/secrets/" if kind == "secret" else "/run/configs/"
                if target.startswith(prefix):
                    target = target[len(prefix):]
                elif target.startswith("/"):
                    if kind == "secret":
                        raise ComposeError(f"{where}.target", f"a secret is a file in "
                                           f"/run/secrets, got {target!r}")
                    svc.warn("configs.target (outside /run/configs)",
                             f"{NOT_YET}: the config is the file /run/configs/"
                             f"{target.rsplit('/', 1)[-1]}")
                    target = target.rsplit("/", 1)[-1]
                ref["target"] = target
            if "mode" in m:
                mode = m["mode"]
                ref["mode"] = int(mode, 8) if isinstance(mode, str) and \
                    re.fullmatch(r"0?[0-7]{1,4}", mode) else as_int(mode, f"{where}.mode")
            if "uid" in m or "gid" in m:
                svc.warn(f"{kind}s.uid/gid", f"{NOT_YET}: the files belong to root")
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


def _short_volume(svc: _Service, text: str, path: str) -> dict[str, Any] | None:
    parts = text.split(":")
    if len(parts) == 1:
        svc.warn("volumes (anonymous volume)", f"{NOT_YET}: give the volume a name; "
                 "not mounted")
        return None
    if len(parts) > 3:
        raise ComposeError(path, f"expected SOURCE:TARGET[:ro|rw], got {text!r}")
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    for opt in options:
        if opt not in ("ro", "rw", "z", "Z", "nocopy", "cached", "delegated", "consistent"):
            raise ComposeError(path, f"unknown volume option {opt!r} in {text!r}")
    kind, src = _named_or_bind(svc, source, path)
    return {"type": kind, "source": src, "target": target, "readonly": "ro" in options}


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
    if "source" not in m or not m["source"]:
        svc.warn("volumes (anonymous volume)", f"{NOT_YET}: give the volume a name; "
                 "not mounted")
        return None
    source = as_str(m["source"], f"{path}.source")
    if kind == "bind":
        p = Path(os.path.expanduser(source))
        src = str(p if p.is_absolute() else (svc.project_dir / p).resolve())
    else:
        _, src = _named_or_bind(svc, source, f"{path}.source")
    for sub in ("bind", "volume"):
        if sub in m:
            svc.warn(f"volumes.{sub}", f"{NOT_YET}: options ignored")
    return {"type": kind, "source": src, "target": target, "readonly": readonly}


def _tmpfs(svc: _Service, v: Any, path: str) -> None:
    for i, target in enumerate(as_str_list(v, path)):
        where = f"{path}[{i}]" if isinstance(v, list) else path
        dst, _, opts = target.partition(":")
        size = 0
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key == "size":
                size = as_size(value, where)
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
    elif head == "CMD" and rest:
        svc.set("task.container.healthcheck.command", shlex.join(rest), path)
    elif head == "CMD-SHELL" and len(rest) == 1:
        svc.set("task.container.healthcheck.command", rest[0], path)
    else:
        raise ComposeError(path, "expected \"CMD-SHELL command\", [\"CMD\", ARGS...], "
                           f"[\"CMD-SHELL\", \"command\"] or [\"NONE\"], got {argv!r}")


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
    stack's names for them); each must be declared under the top-level ``networks:``."""
    if isinstance(v, list):
        keys = {as_str(k, f"{path}[{i}]"): None for i, k in enumerate(v)}
    else:
        keys = dict(as_map(v, path))
    names = []
    for key, opts in keys.items():
        if key not in svc.networks:
            raise ComposeError(f"{path}.{key}", "not declared under the top-level networks:")
        if opts:
            for k in as_map(opts, f"{path}.{key}"):
                svc.warn(f"networks.{k}", f"{NOT_YET}: ignored (a service is reached by its "
                         "name on each of its networks)")
        names.append(svc.networks[key])
    svc.set("task.networks", names, path)


def _init(svc: _Service, v: Any, path: str) -> None:
    if not as_bool(v, path):
        svc.warn("init: false", f"{NOT_YET}: shoal always runs an init (tini) in a task")


def _restart_condition(svc: _Service, v: Any, path: str) -> None:
    c = as_str(v, path)
    if c not in ("none", "on-failure", "any"):
        raise ComposeError(path, f"expected none, on-failure or any, got {c!r}")
    svc.set("task.restart.condition", c, path)


def _stop_signal(svc: _Service, v: Any, path: str) -> None:
    s = as_str(v, path).upper()
    svc.set("task.container.stop_signal", s if s.startswith("SIG") else f"SIG{s}", path)


def _x_http(svc: _Service, v: Any, path: str) -> None:
    svc.health_test_given = True
    svc.set("task.container.healthcheck.http", as_str(v, path), path)


def _x_tcp(svc: _Service, v: Any, path: str) -> None:
    svc.health_test_given = True
    svc.set("task.container.healthcheck.tcp", as_int(v, path), path)


def _update_rules(prefix: str, spec: str) -> dict[str, Rule]:
    return {
        f"{prefix}": SECTION,
        f"{prefix}.parallelism": _to(f"{spec}.parallelism", as_int),
        f"{prefix}.delay": _to(f"{spec}.delay", as_duration),
        f"{prefix}.failure_action": _to(f"{spec}.failure_action", as_str),
        f"{prefix}.monitor": _to(f"{spec}.monitor", as_duration),
        f"{prefix}.max_failure_ratio": _to(f"{spec}.max_failure_ratio", as_float),
        f"{prefix}.order": _to(f"{spec}.order", as_str),
    }


# The one table: every key of a Compose service, as Swarm reads it (dotted under the
# service). To wire a new spec field, replace its LATER entry with a handler.
KEYS: dict[str, Rule] = {
    "image": Rule(_image),
    "command": Rule(_command),
    "entrypoint": Rule(_entrypoint),
    "environment": Rule(_environment),
    "env_file": Rule(_env_file),
    "ports": Rule(_ports),
    "secrets": Rule(_file_refs("secret")),
    "configs": Rule(_file_refs("config")),
    "volumes": Rule(_volumes),
    "tmpfs": Rule(_tmpfs),
    "user": _to("task.container.user", as_str),
    "working_dir": _to("task.container.workdir", as_str),
    "hostname": _to("task.container.hostname", as_str),
    "stop_signal": Rule(_stop_signal),
    "stop_grace_period": _to("task.container.stop_grace_period", as_duration),
    "init": Rule(_init),
    "healthcheck": SECTION,
    "healthcheck.test": Rule(_health_test),
    "healthcheck.interval": _to("task.container.healthcheck.interval", as_duration),
    "healthcheck.timeout": _to("task.container.healthcheck.timeout", as_duration),
    "healthcheck.retries": _to("task.container.healthcheck.retries", as_int),
    "healthcheck.start_period": _to("task.container.healthcheck.start_period", as_duration),
    "healthcheck.start_interval": LATER,
    "healthcheck.disable": _to("task.container.healthcheck.disable", as_bool),
    # shoal's own probes (extension keys, ignored by other Compose tools)
    "healthcheck.x-http": Rule(_x_http),
    "healthcheck.x-tcp": Rule(_x_tcp),
    "deploy": SECTION,
    "deploy.mode": Rule(_deploy_mode),
    "deploy.replicas": _to("mode.replicas", as_int),
    "deploy.labels": Rule(lambda svc, v, path: svc.set("labels", as_labels(v, path), path)),
    "deploy.endpoint_mode": LATER,
    "deploy.resources": SECTION,
    "deploy.resources.limits": SECTION,
    "deploy.resources.limits.cpus": _to("task.resources.limits.cpu", as_float),
    "deploy.resources.limits.memory": _to("task.resources.limits.memory", as_size),
    "deploy.resources.limits.pids": _to("task.resources.limits.pids", as_int),
    "deploy.resources.reservations": SECTION,
    "deploy.resources.reservations.cpus": _to("task.resources.reservations.cpu", as_float),
    "deploy.resources.reservations.memory": _to("task.resources.reservations.memory",
                                                as_size),
    "deploy.resources.reservations.generic_resources": LATER,
    "deploy.resources.reservations.devices": LATER,
    "deploy.restart_policy": SECTION,
    "deploy.restart_policy.condition": Rule(_restart_condition),
    "deploy.restart_policy.delay": _to("task.restart.delay", as_duration),
    "deploy.restart_policy.max_attempts": _to("task.restart.max_attempts", as_int),
    "deploy.restart_policy.window": _to("task.restart.window", as_duration),
    **_update_rules("deploy.update_config", "update"),
    **_update_rules("deploy.rollback_config", "rollback"),
    "deploy.placement": SECTION,
    "deploy.placement.constraints": _to("task.placement.constraints", as_str_list),
    "deploy.placement.preferences": Rule(_preferences),
    "deploy.placement.max_replicas_per_node": _to("task.placement.max_replicas", as_int),
    # Swarm reads these; shoal's spec has no field for them yet
    "labels": Rule(why=f"{NOT_YET} (container labels; deploy.labels sets the service's)"),
    "networks": Rule(lambda svc, v, path: _service_networks(svc, v, path)),
    "cap_add": LATER, "cap_drop": LATER, "sysctls": LATER, "ulimits": LATER,
    "dns": LATER, "dns_search": LATER, "dns_opt": LATER, "extra_hosts": LATER,
    "logging": LATER, "read_only": LATER, "tty": LATER, "stdin_open": LATER,
    "isolation": LATER, "credential_spec": LATER, "group_add": LATER, "domainname": LATER,
    "shm_size": LATER, "mac_address": LATER, "oom_score_adj": LATER, "platform": LATER,
    "privileged": LATER, "devices": LATER, "gpus": LATER, "annotations": LATER,
    "runtime": LATER, "storage_opt": LATER, "pid": LATER, "ipc": LATER, "uts": LATER,
    # Keys of the Compose Specification that do not apply to a stack
    "build": IGNORE, "depends_on": IGNORE, "container_name": IGNORE, "links": IGNORE,
    "external_links": IGNORE, "network_mode": IGNORE, "restart": IGNORE,
    "security_opt": IGNORE, "userns_mode": IGNORE, "cgroup_parent": IGNORE, "cgroup": IGNORE,
    "profiles": IGNORE, "pull_policy": IGNORE, "scale": IGNORE, "expose": IGNORE,
    "extends": IGNORE, "volumes_from": IGNORE, "develop": IGNORE, "attach": IGNORE,
    "blkio_config": IGNORE, "cpu_count": IGNORE, "cpu_percent": IGNORE, "cpu_shares": IGNORE,
    "cpu_quota": IGNORE, "cpu_period": IGNORE, "cpu_rt_period": IGNORE,
    "cpu_rt_runtime": IGNORE, "cpus": IGNORE, "cpuset": IGNORE, "mem_limit": IGNORE,
    "mem_reservation": IGNORE, "mem_swappiness": IGNORE, "memswap_limit": IGNORE,
    "oom_kill_disable": IGNORE, "pids_limit": IGNORE, "device_cgroup_rules": IGNORE,
    "label_file": IGNORE, "post_start": IGNORE, "pre_stop": IGNORE, "provider": IGNORE,
    "use_api_socket": IGNORE, "driver_opts": IGNORE, "models": IGNORE,
}


def _apply(svc: _Service, prefix: str, value: Any, path: str) -> None:
    """Every key of the mapping ``value`` (at table prefix ``prefix``) through its rule."""
    for key, v in as_map(value, path).items():
        dotted = f"{prefix}.{key}" if prefix else key
        where = f"{path}.{key}"
        rule = KEYS.get(dotted)
        if rule is None:
            if key.startswith("x-"):
                continue
            raise ComposeError(where, "unknown key (not in the Compose Specification)")
        if rule.handle is not None:
            rule.handle(svc, v, where)
        elif rule.section:
            _apply(svc, dotted, v, where)
        else:
            svc.warn(dotted, rule.why)


# where a spec field comes from, for errors the spec's own validation finds
_SPEC_TO_COMPOSE = {
    "name": "", "labels": "deploy.labels", "task.container.image": "image",
    "task.container.command": "command", "task.container.env": "environment",
    "task.container.workdir": "working_dir", "task.container.user": "user",
    "task.container.hostname": "hostname", "task.container.stop_signal": "stop_signal",
    "task.container.stop_grace_period": "stop_grace_period",
    "task.container.mounts": "volumes", "task.container.secrets": "secrets",
    "task.container.configs": "configs", "task.container.healthcheck": "healthcheck",
    "task.resources.limits": "deploy.resources.limits",
    "task.resources.reservations": "deploy.resources.reservations",
    "task.restart": "deploy.restart_policy",
    "task.placement.constraints": "deploy.placement.constraints",
    "mode.replicas": "deploy.replicas", "update": "deploy.update_config",
    "rollback": "deploy.rollback_config", "endpoint.ports": "ports",
}


def _compose_path(svc: _Service, field_path: str) -> str:
    """The Compose path of a spec field named by a validation error."""
    best = ""
    for spec_path in sorted(set(_SPEC_TO_COMPOSE) | set(svc.spec_paths), key=len):
        if field_path == spec_path or field_path.startswith((spec_path + ".",
                                                            spec_path + "[")):
            best = spec_path
    if not best:
        return svc.path
    compose = svc.spec_paths.get(best) or f"{svc.path}.{_SPEC_TO_COMPOSE[best]}".rstrip(".")
    rest = field_path[len(best):]
    m = re.match(r"\[(\d+)\]", rest)
    if best == "task.container.mounts" and m and int(m.group(1)) < len(svc.mount_paths):
        # (volumes and tmpfs share the mounts list: name the entry that made the mount)
        return svc.mount_paths[int(m.group(1))]
    return compose + rest


def translate_service(stack: str, key: str, body: Any, project_dir: Path,
                      env: Mapping[str, str], objects: dict[str, dict[str, FileObject]],
                      volumes: dict[str, str], warnings: _Warnings,
                      networks: dict[str, str] | None = None) -> ServiceSpec:
    """One ``services.KEY`` mapping → a validated ServiceSpec named ``STACK_KEY``."""
    path = f"services.{key}"
    svc = _Service(stack=stack, key=key, path=path, project_dir=project_dir, env=env,
                   objects=objects, volumes=volumes, warnings=warnings,
                   networks=networks or {})
    if body is None:
        body = {}
    _apply(svc, "", body, path)
    name = f"{stack}_{key}"
    svc.set("name", name, path)
    labels = dict(svc.spec.get("labels") or {})
    labels[STACK_LABEL] = stack
    svc.spec["labels"] = labels
    if svc.env_files or svc.environment:
        svc.spec.setdefault("task", {}).setdefault("container", {})["env"] = {
            **svc.env_files, **svc.environment}
    if svc.mounts:
        svc.set("task.container.mounts", svc.mounts,
                svc.spec_paths.get("task.container.mounts", f"{path}.volumes"))
    container = svc.spec.get("task", {}).get("container", {})
    if svc.entrypoint is not None:
        if container.get("image"):
            svc.warn("entrypoint", f"{NOT_YET} with an image: the image's ENTRYPOINT is "
                     "kept, command gives its arguments")
        else:  # the host's root filesystem: the program is entrypoint + command
            svc.set("task.container.command",
                    svc.entrypoint + list(container.get("command", [])), f"{path}.entrypoint")
    health = container.get("healthcheck", {})
    if health.get("disable") and svc.health_test_given:
        for probe in ("command", "http", "tcp"):  # (Compose: disable wins over test)
            health.pop(probe, None)
    try:
        return validate_spec(svc.spec)
    except ValidationError as exc:
        where = _compose_path(svc, exc.field)
        msg = exc.message
        if msg.startswith(exc.field + ": "):
            msg = msg[len(exc.field) + 2:]
        raise ComposeError(where, f"{msg} (spec field {exc.field})") from None


# ----------------------------------------------------------------------------- the file

_TOP_KEYS = {"version", "name", "services", "networks", "volumes", "secrets", "configs",
             "include", "models"}


def _objects(stack: str, kind: str, section: Any, project_dir: Path, env: Mapping[str, str],
             warnings: _Warnings) -> dict[str, FileObject]:
    out: dict[str, FileObject] = {}
    for key, body in as_map(section or {}, f"{kind}s").items():
        path = f"{kind}s.{key}"
        m = as_map(body if body is not None else {}, path)
        known = {"file", "external", "name", "labels", "environment", "content", "driver",
                 "driver_opts", "template_driver"}
        for k in m:
            if k not in known and not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
        for k in ("driver", "driver_opts", "template_driver"):
            if k in m:
                warnings.add(f"{kind}s.{k}", f"{NOT_YET}: ignored")
        labels = as_labels(m.get("labels") or {}, f"{path}.labels")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            name = as_str(ext.get("name", m.get("name", key)), f"{path}.external.name")
            external = True
        else:
            external = as_bool(ext, f"{path}.external")
            name = as_str(m.get("name", key if external else f"{stack}_{key}"), f"{path}.name")
        if external:
            out[key] = FileObject(kind, key, name, None)
            continue
        sources = [k for k in ("file", "environment", "content") if k in m]
        if len(sources) != 1 or (kind == "secret" and sources == ["content"]):
            allowed = "file: or environment:" if kind == "secret" else \
                "file:, environment: or content:"
            raise ComposeError(path, f"give exactly one of {allowed} (or external: true)")
        src = sources[0]
        if src == "file":
            file = project_dir / as_str(m["file"], f"{path}.file")
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise ComposeError(f"{path}.file", f"cannot read {file}: "
                                   f"{exc.strerror}") from None
        elif src == "environment":
            var = as_str(m["environment"], f"{path}.environment")
            if var not in env:
                raise ComposeError(f"{path}.environment", f"the variable {var} is not set")
            data = env[var].encode()
        else:
            data = as_str(m["content"], f"{path}.content").encode()
        out[key] = FileObject(kind, key, name, data, {**labels, STACK_LABEL: stack})
    return out


def _networks(stack: str, section: Any, warnings: _Warnings) -> dict[str, NetworkObject]:
    """The top-level ``networks:`` → the stack's networks (``STACK_KEY`` unless named or
    external), overlay networks of the cluster (shoal.node.overlay)."""
    out: dict[str, NetworkObject] = {}
    for key, body in as_map(section or {}, "networks").items():
        path = f"networks.{key}"
        m = as_map(body if body is not None else {}, path)
        known = {"driver", "driver_opts", "attachable", "enable_ipv6", "ipam", "internal",
                 "labels", "external", "name"}
        for k in m:
            if k not in known and not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
        driver = as_str(m.get("driver", "overlay"), f"{path}.driver")
        if driver != "overlay":
            raise ComposeError(f"{path}.driver", f"expected overlay (the only driver of a "
                               f"stack's networks), got {driver!r}")
        for k in ("driver_opts", "enable_ipv6"):
            if k in m:
                warnings.add(f"networks.{k}", f"{NOT_YET}: ignored")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            out[key] = NetworkObject(key, as_str(ext.get("name", m.get("name", key)),
                                                 f"{path}.external.name"), external=True)
            continue
        if as_bool(ext, f"{path}.external"):
            out[key] = NetworkObject(key, as_str(m.get("name", key), f"{path}.name"),
                                     external=True)
            continue
        subnet = ""
        ipam = as_map(m.get("ipam") or {}, f"{path}.ipam")
        configs = ipam.get("config") or []
        if not isinstance(configs, list):
            raise ComposeError(f"{path}.ipam.config", "expected a list of {subnet: CIDR}")
        if configs:
            first = as_map(configs[0], f"{path}.ipam.config[0]")
            subnet = as_str(first.get("subnet", ""), f"{path}.ipam.config[0].subnet")
            if len(configs) > 1 or set(first) - {"subnet"}:
                warnings.add("networks.ipam", f"{NOT_YET}: only the first subnet is used")
        labels = as_labels(m.get("labels") or {}, f"{path}.labels")
        labels[STACK_LABEL] = stack
        out[key] = NetworkObject(
            key, as_str(m.get("name", f"{stack}_{key}"), f"{path}.name"),
            internal=as_bool(m.get("internal", False), f"{path}.internal"),
            attachable=as_bool(m.get("attachable", False), f"{path}.attachable"),
            subnet=subnet, labels=labels)
    return out


def _volume_names(stack: str, section: Any, warnings: _Warnings) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, body in as_map(section or {}, "volumes").items():
        path = f"volumes.{key}"
        m = as_map(body if body is not None else {}, path)
        for k in m:
            if k not in ("external", "name", "driver", "driver_opts", "labels") and \
                    not k.startswith("x-"):
                raise ComposeError(f"{path}.{k}", "unknown key (not in the Compose "
                                   "Specification)")
            if k in ("driver", "driver_opts", "labels"):
                warnings.add(f"volumes.{k}", f"{NOT_YET}: volumes are local directories "
                             "on each node")
        ext = m.get("external", False)
        if isinstance(ext, dict):
            out[key] = as_str(ext.get("name", m.get("name", key)), f"{path}.external.name")
        elif as_bool(ext, f"{path}.external"):
            out[key] = as_str(m.get("name", key), f"{path}.name")
        else:
            out[key] = as_str(m.get("name", f"{stack}_{key}"), f"{path}.name")
    return out


def load(paths: list[Path], environ: Mapping[str, str] | None = None
         ) -> tuple[dict[str, Any], Path, dict[str, str], list[str]]:
    """Read, interpolate and merge the files: (document, project directory, the environment
    used, warnings). The project directory is the first file's; its ``.env`` gives variables
    the environment does not set."""
    if not paths:
        raise ComposeError("", "no Compose file given (-c FILE)")
    project_dir = paths[0].resolve().parent
    env: dict[str, str] = {}
    dotenv = project_dir / ".env"
    if dotenv.is_file():
        env.update(read_env_file(dotenv, str(dotenv)))
    env.update(os.environ if environ is None else environ)
    warnings: list[str] = []
    doc: dict[str, Any] = {}
    for p in paths:
        try:
            text = (p.read_text() if str(p) != "-" else _stdin())
        except OSError as exc:
            raise ComposeError(str(p), f"cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ComposeError(str(p), "not UTF-8 text") from None
        one = parse_yaml(text, str(p))
        for k in one:
            if k not in _TOP_KEYS and not str(k).startswith("x-"):
                raise ComposeError(str(k), "unknown top-level key (not in the Compose "
                                   "Specification)")
        one = interpolate({k: v for k, v in one.items() if not str(k).startswith("x-")}, env,
                          warnings)
        doc = merge(doc, one)
    return doc, project_dir, env, list(dict.fromkeys(warnings))


def _stdin() -> str:
    import sys
    return sys.stdin.read()


def translate(stack: str, doc: dict[str, Any], project_dir: Path, env: Mapping[str, str],
              warnings: list[str] | None = None) -> Stack:
    """An interpolated, merged document → the Stack (every spec validated), or the first
    ComposeError."""
    if not STACK_NAME_RE.match(stack):
        raise ComposeError("", f"stack name {stack!r} is invalid: use 1-32 lower-case "
                           "letters, digits and '-'")
    w = _Warnings()
    w.plain.extend(warnings or [])
    if "include" in doc:
        w.add("include", NOT_YET)
    services = as_map(doc.get("services") or {}, "services")
    if not services:
        raise ComposeError("services", "the file defines no service")
    objects = {kind: _objects(stack, kind, doc.get(f"{kind}s"), project_dir, env, w)
               for kind in ("secret", "config")}
    volumes = _volume_names(stack, doc.get("volumes"), w)
    networks = _networks(stack, doc.get("networks"), w)
    names = {k: n.name for k, n in networks.items()}
    specs = [translate_service(stack, str(key), body, project_dir, env, objects, volumes, w,
                               names) for key, body in services.items()]
    return Stack(name=stack, services=specs, secrets=list(objects["secret"].values()),
                 configs=list(objects["config"].values()), warnings=w.render(),
                 networks=list(networks.values()))


def load_stack(stack: str, paths: list[Path], environ: Mapping[str, str] | None = None
               ) -> Stack:
    """The files of `stack deploy -c FILE [-c OVERRIDE ...] STACK` → the Stack to deploy."""
    doc, project_dir, env, warnings = load(paths, environ)
    return translate(stack, doc, project_dir, env, warnings)


def label_of(obj: Mapping[str, Any]) -> str:
    """The stack an API object (its ``labels`` or ``spec.labels``) belongs to; "" if none."""
    labels = obj.get("labels") or (obj.get("spec") or {}).get("labels") or {}
    return str(labels.get(STACK_LABEL, ""))
