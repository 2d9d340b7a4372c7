"""The whole cluster state as bytes, and back: what a manager sends a worker that is too far
behind to catch up command by command (shoal.node.feed).

Owns: encoding a ``ClusterState`` as msgpack of plain values (``to_dict``) and rebuilding it,
typed, from the dataclass field annotations — so a field added to a record travels without
touching this module, and a field missing in the bytes takes its default. Never pickle: the
bytes cross the network. Must not touch: how the state is fed or stored.

Errors: ``WireError`` (a ValueError) for bytes that are not a well-formed state.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

import msgpack
import msgspec

from shoal.raft import schema
from shoal.raft.errors import WireError
from shoal.raft.models import (
    ServiceSpec,
    TaskSpec,
    spec_from_dict,
    task_spec_from_dict,
    to_dict,
)
from shoal.raft.state import ClusterState

MAX_STATE_BYTES = 256 << 20


def state_to_bytes(state: ClusterState, legacy: bool = False) -> bytes:
    """The state as msgpack; ``legacy`` writes specs as schema 1 (shoal 0.1) reads them, for a
    cluster whose schema is still 1; below schema.SCHEMA, specs leave out the later fields
    they do not use (shoal.raft.schema)."""
    if not legacy and state.cluster.schema >= schema.SCHEMA:
        # each shared template converted once (most of the time at 100k tasks); the plain
        # form is packed as is, never edited in place (strip_state/_downgrade would)
        return bytes(msgpack.packb(to_dict(state, {}), use_bin_type=True))
    raw = to_dict(state)
    if legacy:
        raw = _downgrade(raw)
    elif state.cluster.schema < schema.SCHEMA:  # (a node may still run an older 0.2)
        raw = schema.strip_state(raw, state.cluster.schema)
    return bytes(msgpack.packb(raw, use_bin_type=True))


def _downgrade(raw: dict[str, Any]) -> dict[str, Any]:
    services = raw.get("services", {})
    for svc in services.values():
        full = svc["spec"]
        if svc.get("previous_spec"):
            svc["previous_spec"] = schema.downgrade_spec(svc["previous_spec"])
        svc["spec"] = schema.downgrade_spec(full)
        svc["_full"] = full
    for task in raw.get("tasks", {}).values():
        svc = services.get(task["service_id"])
        base = svc["_full"] if svc else {"name": task["service_name"]}
        task["spec"] = schema.downgrade_spec(_complete({**base, "task": task["spec"]}))
    for svc in services.values():
        svc.pop("_full", None)
    return raw


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict with every field (defaults filled in)."""
    return to_dict(spec_from_dict(spec)) if "mode" not in spec else spec


def state_from_plain(raw: Any) -> ClusterState:
    """Plain values (as ``to_dict`` makes them, schema 1 or 2) → a ClusterState."""
    state = _build(ClusterState, raw, "state", {})
    assert isinstance(state, ClusterState)
    return state


def state_from_bytes(data: bytes) -> ClusterState:
    if len(data) > MAX_STATE_BYTES:
        raise WireError(f"state of {len(data)} bytes is larger than {MAX_STATE_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise WireError(f"undecodable state: {exc}") from None
    try:
        state = _build(ClusterState, raw, "state", {})
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed state: {exc}") from None
    assert isinstance(state, ClusterState)
    return state


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = _hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _build(tp: Any, value: Any, where: str, shared: dict[bytes, TaskSpec]) -> Any:
    """``value`` (plain msgpack data) as an instance of the annotation ``tp``.

    ``shared`` (one decoding's): task templates by their msgpack bytes, so the tasks of a
    service share one TaskSpec, the service's own, as in the state they were encoded from —
    built once, and a restarted manager does not hold a copy per task (+300 MiB at 100k
    tasks, bench/snapshot_bench.py)."""
    # the plain types first: most of the values (a restart decodes ~30 per task)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str or tp is int or tp is bool or tp is bytes:
        _expect(value, tp, where)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, where, shared)
            except (KeyError, TypeError, ValueError):
                continue
        raise TypeError(f"{where}: {value!r} fits none of {tp}")
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        _expect(value, dict, where)
        return {_build(key_tp, k, where, shared): _build(val_tp, v, f"{where}[{k!r}]", shared)
                for k, v in value.items()}
    if origin in (tuple, list):
        _expect(value, list, where)
        item_tp = typing.get_args(tp)[0]
        items = [_build(item_tp, v, f"{where}[{i}]", shared) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _expect(value, dict, where)
        kwargs = {name: _build(hint, value[name], f"{where}.{name}", shared)
                  for name, hint in _fields(tp) if name in value}
        return tp(**kwargs)
    if tp is ServiceSpec:
        _expect(value, dict, where)
        spec = spec_from_dict(value)
        if isinstance(value.get("task"), dict):  # (a schema-1 flat spec has none)
            key = msgpack.packb(value["task"], use_bin_type=True)
            known = shared.get(key)
            if known is None:
                shared[key] = spec.task
            elif known == spec.task:
                spec = msgspec.structs.replace(spec, task=known)
        return spec
    if tp is TaskSpec:
        _expect(value, dict, where)
        key = msgpack.packb(value, use_bin_type=True)
        task_spec = shared.get(key)
        if task_spec is None:
            task_spec = shared[key] = task_spec_from_dict(value)
        return task_spec
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return msgspec.convert(value, tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is Any:
        return value
    raise TypeError(f"{where}: cannot decode type {tp}")


def _expect(value: Any, tp: type, where: str) -> None:
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
