"""Reading Compose text: YAML, ``.env`` files, variable interpolation, override merging.

Owns: the YAML loader (PyYAML's safe loader with YAML 1.2 core-schema scalars, as Compose's
Go parser: ``80:80`` stays a string, ``yes`` is not a boolean), ``.env`` parsing, variable
interpolation (``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``$$``) and Compose's override merge
rules. Pure functions of text and an environment. Must not touch: what the keys mean (that is
shoal.cli.compose and shoal.cli.compose_keys), the cluster.

Errors: ``ComposeError`` (shoal.cli.errors) whose message starts with the path or file.
"""

from __future__ import annotations

import os
import re
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from shoal.cli.errors import ComposeError

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


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping; a key given twice is an error (as Compose's parser), not the last one
    silently winning."""
    seen: set[str] = set()
    for key_node, _ in node.value:  # (before merge keys << bring theirs, which may be overridden)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        if key_node.value in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key_node.value!r} is given twice", key_node.start_mark)
        seen.add(key_node.value)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        _mapping_without_duplicates)


class Dumper(yaml.SafeDumper):
    """YAML out (`stack config`) that reads back as it was, by shoal (YAML 1.2 scalars) and by
    YAML 1.1 parsers alike: a string either would take for something else ("1e3" a number in
    1.2, "yes" a boolean in 1.1) is quoted; no &id001 anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


Dumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []),
            *_Loader.yaml_implicit_resolvers.get(first, [])]
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_Loader.yaml_implicit_resolvers}}


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

_ENV_LINE_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*(=\s*(.*))?$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$$"}


def parse_env_file(text: str, source: str, environ: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """An env file as Docker Compose reads it (docs.docker.com, "Set environment variables"
    / .env syntax) → a map: ``KEY=VALUE`` lines, ``#`` comments, blank lines, ``export``;
    an unquoted value ends at `` #``; ``'single'`` quotes are literal; ``"double"`` quotes
    may span lines and take ``\n \t \r \" \\`` escapes; unquoted and double-quoted
    values interpolate ``${VAR}`` forms from the keys above and ``environ``; a bare ``KEY``
    takes its value from ``environ`` (left out when unset)."""
    env = dict(environ if environ is not None else os.environ)
    out: dict[str, str] = {}
    lines = text.removeprefix("\ufeff").splitlines()
    n = 0
    while n < len(lines):
        line, first = lines[n], n + 1
        n += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ENV_LINE_RE.match(line)
        if m is None:
            raise ComposeError(f"{source}:{first}", f"expected KEY=VALUE, got {line.strip()!r}")
        key = m.group(1)
        if m.group(2) is None:  # a bare KEY: from the environment
            if key in env:
                out[key] = env[key]
            continue
        value = (m.group(3) or "").strip()
        if value.startswith('"'):
            body = value[1:]
            while not re.search(r'(?<!\\)(?:\\\\)*"', body):  # (no closing quote yet)
                if n >= len(lines):
                    raise ComposeError(f"{source}:{first}", f"{key}: the double quote is "
                                       "never closed")
                body += "\n" + lines[n]
                n += 1
            close = re.search(r'(?<!\\)(?:\\\\)*"', body)
            assert close is not None
            inner, rest = body[:close.end() - 1], body[close.end():].strip()
            if rest and not rest.startswith("#"):
                raise ComposeError(f"{source}:{first}", f"{key}: unexpected {rest!r} after "
                                   "the closing quote")
            raw = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), "\\" + e.group(1)),
                         inner)
            value = _Interpolator(ChainMap(out, env)).text(raw, f"{source}:{first}")
        elif value.startswith("'"):
            close_at = value.find("'", 1)
            if close_at < 0:
                raise ComposeError(f"{source}:{first}", f"{key}: the single quote is never "
                                   "closed")
            rest = value[close_at + 1:].strip()
            if rest and not rest.startswith("#"):
                raise ComposeError(f"{source}:{first}", f"{key}: unexpected {rest!r} after "
                                   "the closing quote")
            value = value[1:close_at]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
            value = _Interpolator(ChainMap(out, env)).text(
                value, f"{source}:{first}")
        out[key] = value
    return out


def read_env_file(path: Path, source: str, environ: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    try:
        return parse_env_file(path.read_text(), source, environ)
    except OSError as exc:
        raise ComposeError(source, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ComposeError(source, f"{path} is not UTF-8 text") from None


# ----------------------------------------------------------------------------- interpolation

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Interpolator:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.unset: dict[str, list[str]] = {}  # variable not set → where it is used

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
            self.unset.setdefault(name, []).append(path)
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
                warnings: list[str] | None = None, at: str = "") -> Any:
    """``doc`` with every string value interpolated from ``env`` (keys are not); ``at`` is
    where ``doc`` is (warnings and errors name the paths below it)."""
    sink = warnings if warnings is not None else []
    interpolator = _Interpolator(env)
    out = interpolator.walk(doc, at)
    for name, paths in interpolator.unset.items():  # (one warning a variable, as Docker)
        more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
        sink.append(f"the {name} variable is not set: it is replaced by an empty string "
                    f"(at {', '.join(paths[:2])}{more})")
    return out


# ----------------------------------------------------------------------------- merging

# service keys whose list items an override adds to (same item replaced, or duplicates
# dropped) instead of appending them all
_MERGED_LISTS = {"ports", "secrets", "configs", "volumes", "env_file", "cap_add", "cap_drop",
                 "extra_hosts", "dns", "dns_search", "expose", "tmpfs"}
_SCALAR_OR_LIST = {"env_file", "dns", "dns_search", "tmpfs"}  # a string is a list of one
_MAPPED_LISTS = {"environment", "labels", "sysctls"}  # KEY=VALUE lists that merge as maps
_REPLACED_LISTS = {"command", "entrypoint", "test"}  # commands: replaced (merge's exception)


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


def merge(base: Any, over: Any, key: str = "", depth: int = 0, service: bool = False) -> Any:
    """Compose's override rules (compose-spec's merge, as compose-go's override package):
    maps merge recursively; ``environment``, ``labels`` (also ``deploy.labels``),
    ``sysctls``, ``build.args`` and a service's ``networks`` merge as maps; ``volumes``,
    ``secrets``, ``configs`` and ``ports`` add the override's items, an item with the same
    mount target (ports: the same published port, target and protocol) replacing the
    base's; ``env_file``, ``dns``, ``cap_add``... are concatenated without duplicates (a
    string being a list of one); ``build: DIR`` is ``{context: DIR}`` when the other side
    is a mapping; within a service, other lists append the items they lack (aliases,
    placement constraints, profiles, security_opt...), except ``command``, ``entrypoint``
    and ``healthcheck.test``, which are replaced as any other value. ``depth`` is the level
    of ``key`` (a service's keys are at 3); ``service``: within ``services.NAME``."""
    if (depth == 3 and key in _MAPPED_LISTS) or (depth >= 3 and key == "labels") or \
            (depth == 3 and key == "networks") or \
            (service and depth == 4 and key == "args"):  # (services.NAME.environment, ...)
        base, over = _as_map(base), _as_map(over)
    if service and depth == 3:
        if key in _SCALAR_OR_LIST:
            base, over = ([v] if isinstance(v, str) else v for v in (base, over))
        elif key == "build" and isinstance(base, dict) != isinstance(over, dict):
            base, over = ({"context": v} if isinstance(v, str) else v for v in (base, over))
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v, str(k), depth + 1,
                           service or (depth == 1 and key == "services")) if k in base else v
        return out
    if depth == 3 and key in _MERGED_LISTS and isinstance(base, list) \
            and isinstance(over, list):
        ident = _IDENTITY.get(key)
        if ident is None:
            return base + [v for v in over if v not in base]
        replaced = {ident(v) for v in over} - {None}
        kept = [v for v in base if ident(v) is None or ident(v) not in replaced]
        return kept + [v for v in over if v not in kept]
    if service and depth >= 3 and key not in _REPLACED_LISTS and isinstance(base, list) \
            and isinstance(over, list):
        return base + [v for v in over if v not in base]
    return over


def _mount_target(item: Any) -> Any:
    """The target of a volume (``src:/dst[:ro]`` or ``{target: /dst}``): its identity."""
    if isinstance(item, dict):
        return item.get("target")
    if isinstance(item, str):
        parts = item.split(":")
        return parts[1] if len(parts) >= 2 else parts[0]
    return None


def _file_target(item: Any) -> Any:
    """A secret's or config's target (its source when not given): its identity."""
    if isinstance(item, dict):
        return item.get("target") or item.get("source")
    return item if isinstance(item, str) else None


def _port_identity(item: Any) -> Any:
    """(published, target, protocol) of a port as both syntaxes give it (an unreadable
    item keeps no identity: concatenated as it is)."""
    if isinstance(item, dict):
        return (str(item.get("published", "")), str(item.get("target", "")),
                str(item.get("protocol", "tcp")).lower())
    text = str(item)
    m = PORT_RE.match(text)
    if m is None:
        return None
    return (m.group("pub") or "", m.group("target"), (m.group("proto") or "tcp").lower())


# a port in Compose's short syntax, [[IP:]PUBLISHED:]TARGET[/PROTOCOL] (ranges allowed):
# read by compose_keys._ports, and by the merge for an item's identity
PORT_RE = re.compile(r"^(?:(?P<ip>\[[^\]]*\]|[^:\[\]]*):)??(?:(?P<pub>[0-9]*(?:-[0-9]+)?):)?"
                     r"(?P<target>[0-9]+(?:-[0-9]+)?)(?:/(?P<proto>[A-Za-z]+))?$")
_IDENTITY: dict[str, Callable[[Any], Any]] = {
    "volumes": _mount_target, "secrets": _file_target, "configs": _file_target,
    "ports": _port_identity}
