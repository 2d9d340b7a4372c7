"""Generic resources (Swarm's ``--generic-resource``): what a node advertises, what a task
reserves, and the environment a task gets.

Owns: the rules of a kind's name and of its values, the checks of a node's generic
resources (``check_node``: ValidationError naming the field) and their forgiving reading
from a record (``node_resources``), ``node update --generic-resource-add/-rm`` applied to a
node's resources (``updated``), an agent's flag against its node's record
(``flag_drift``), a task's reservation per kind (``reserved``) and the
``DOCKER_RESOURCE_<KIND>`` variables of a task (``env_name``; ``held_ids`` reads them back).
Must not touch: I/O, the store, the scheduler's accounting (shoal.node.scheduler), the
worker's choice of named IDs (shoal.node.generic).

A node's resource of a kind is either *discrete* (a count: ``SSD=3``, stored as an int) or
*named* (a set of IDs: ``GPU=UUID1``, ``GPU=UUID2``, stored as a list of str); a kind is one
or the other on a node. A service reserves a count per kind
(``task.resources.reservations.generic_resources``); a named kind's count is taken from its
IDs. Kinds compare case-insensitively: Swarm compares them exactly but names the task's
variable ``DOCKER_RESOURCE_`` + the kind in upper case, so ``gpu`` and ``GPU`` could only
ever be one variable; shoal makes them one kind (``key``), kept as first written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from shoal.raft.errors import ValidationError

# a kind: letters, digits, '-', '_' and '.', starting with a letter or digit, at most 63
KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# a named resource's ID (a GPU's UUID, a device path's name): no blanks, ',' or '='
ID_RE = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
MAX_KINDS = 32  # kinds per node, and per service
MAX_COUNT = 1_000_000  # a discrete count (a node's, a reservation's)
MAX_IDS = 256  # IDs of one named kind on a node
ENV_PREFIX = "DOCKER_RESOURCE_"  # Swarm's (swarmkit genericresource.EnvFormat)

Resources = dict[str, int | list[str]]  # a node's: kind → count or IDs


def key(kind: str) -> str:
    """The kind as compared (case-insensitively)."""
    return kind.lower()


def env_name(kind: str) -> str:
    """The task's variable for ``kind``: ``DOCKER_RESOURCE_GPU`` (Swarm's)."""
    return ENV_PREFIX + kind.upper()


def check_kind(kind: Any, field: str) -> str:
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise ValidationError(f"{field}: invalid kind {str(kind)[:80]!r}: letters, digits, "
                              "'-', '_' and '.', starting with a letter or digit, at most "
                              "63 characters", field)
    return kind


def _check_kinds(res: Mapping[Any, Any], field: str) -> None:
    """At most MAX_KINDS kinds, each a valid name, none twice whatever its case."""
    if len(res) > MAX_KINDS:
        raise ValidationError(f"{field}: at most {MAX_KINDS} kinds", field)
    seen: set[str] = set()
    for kind in res:
        check_kind(kind, field)
        if key(kind) in seen:
            raise ValidationError(f"{field}: kind {kind!r} given twice (kinds ignore case)",
                                  field)
        seen.add(key(kind))


def check_reservation(res: Mapping[str, Any], field: str) -> None:
    """A service's reservation (kind → count >= 1); ValidationError naming ``field``."""
    _check_kinds(res, field)
    for kind, n in res.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_COUNT:
            raise ValidationError(f"{field}: {kind}: the count must be a whole number from 1 "
                                  f"to {MAX_COUNT}, got {n!r}", field)


def check_node(res: Any, field: str = "generic_resources") -> Resources:
    """A node's generic resources as given (kind → count >= 0, or → a list of distinct IDs),
    checked; ValidationError naming ``field``."""
    if not isinstance(res, dict):
        raise ValidationError(f"{field} must be a map of kind to a count or a list of IDs",
                              field)
    _check_kinds(res, field)
    out: Resources = {}
    for kind, value in res.items():
        where = f"{field}.{kind}"
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_COUNT:
                raise ValidationError(f"{where}: a count from 0 to {MAX_COUNT}, got {value}",
                                      field)
            out[kind] = value
        elif isinstance(value, list) and value:
            if len(value) > MAX_IDS:
                raise ValidationError(f"{where}: at most {MAX_IDS} IDs", field)
            for i in value:
                if not isinstance(i, str) or not ID_RE.match(i):
                    raise ValidationError(
                        f"{where}: invalid ID {str(i)[:80]!r}: 1 to 128 letters, digits or "
                        "'.', '_', ':', '/', '@', '+', '-'", field)
            if len(set(value)) != len(value):
                raise ValidationError(f"{where}: an ID is given twice", field)
            out[kind] = list(value)
        else:
            raise ValidationError(f"{where}: a count or a non-empty list of IDs", field)
    return out


def node_resources(raw: Any) -> Resources:
    """A Node record's resources, read forgivingly (a record without them, or written by a
    newer version: what this version cannot read is left out)."""
    if not isinstance(raw, dict):
        return {}
    out: Resources = {}
    for kind, value in raw.items():
        if not isinstance(kind, str):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            out[kind] = value
        elif isinstance(value, (list, tuple)):
            out[kind] = [str(i) for i in value]
    return out


def find(res: Mapping[str, Any], kind: str) -> str | None:
    """The kind of ``res`` that ``kind`` names (kinds ignore case), or None."""
    k = key(kind)
    return next((have for have in res if key(have) == k), None)


def updated(current: Mapping[str, int | list[str]], add: Iterable[str], rm: Iterable[str]
            ) -> Resources:
    """``current`` with ``node update``'s ``--generic-resource-add KIND=VALUE`` (VALUE all
    digits: the kind's count; else one more named ID) and then ``--generic-resource-rm
    KIND`` (the whole kind) or ``KIND=ID`` (one ID) applied, checked (``check_node``).
    ValidationError naming ``generic_resource_add``/``generic_resource_rm``."""
    out: Resources = {k: (list(v) if isinstance(v, list) else v) for k, v in current.items()}
    for item in add:
        field = "generic_resource_add"
        kind, sep, value = str(item).partition("=")
        if not sep or not value:
            raise ValidationError(f"{field}: expected KIND=VALUE, got {str(item)[:80]!r}",
                                  field)
        check_kind(kind, field)
        have = find(out, kind) or kind
        old = out.get(have)
        if value.isascii() and value.isdigit():
            if isinstance(old, list):
                raise ValidationError(f"{field}: {have} holds named IDs on this node, not a "
                                      f"count: remove it first (--generic-resource-rm {have})",
                                      field)
            out[have] = int(value)
        else:
            if isinstance(old, int):
                raise ValidationError(f"{field}: {have} is a count on this node, not named "
                                      f"IDs: remove it first (--generic-resource-rm {have})",
                                      field)
            ids = old if isinstance(old, list) else []
            if value not in ids:
                ids.append(value)
            out[have] = ids
    for item in rm:
        field = "generic_resource_rm"
        kind, sep, value = str(item).partition("=")
        found = find(out, kind)
        if found is None:  # (as label-rm: a typo is not a silent no-op)
            raise ValidationError(f"{field}: the node has no generic resource {kind!r}", field)
        old = out[found]
        if not sep:
            del out[found]
        elif isinstance(old, list) and value in old:
            old.remove(value)
            if not old:
                del out[found]
        else:
            raise ValidationError(f"{field}: the node's {found} has no ID {value!r}", field)
    return check_node(out, "generic_resource_add")


def units(value: int | list[str]) -> int:
    """How many units a node's resource of a kind has."""
    return value if isinstance(value, int) else len(value)


def reserved(need: Mapping[str, int]) -> dict[str, int]:
    """A task's reservation keyed by ``key``."""
    return {key(k): n for k, n in need.items()}


def held_ids(env: Mapping[str, str], kind: str) -> list[str]:
    """The named IDs of ``kind`` a task's environment says it holds."""
    value = env.get(env_name(kind), "")
    return [i for i in value.split(",") if i]


def flag_drift(flag: Iterable[str], record: Mapping[str, int | list[str]]) -> str:
    """How an agent's ``--generic-resource`` items differ from its node's record ("" = they
    agree; kinds compared ignoring case, IDs as sets)."""
    try:
        given = updated({}, flag, [])
    except ValidationError as exc:
        return exc.message

    def norm(res: Mapping[str, int | list[str]]) -> dict[str, object]:
        return {key(k): (frozenset(v) if isinstance(v, list) else v) for k, v in res.items()}
    if norm(given) == norm(record):
        return ""
    return (f"the node's record has {dict(record) or 'none'}, the flag gives {given}; "
            "`shoal node update --generic-resource-add/-rm` changes the record")
