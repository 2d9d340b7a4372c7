"""Migration of a Raft dump written by schema 1 (shoal 0.1): on disk before pysyncobj reads
it, and as a snapshot a 0.1 leader sends.

Owns: reading a schema-1 dump (the ClusterState pickled with 0.1's flat spec classes) without
those classes, and rewriting it in today's format; ``read_legacy_snapshots()``, which makes
pysyncobj read the snapshots it receives the same way (a 0.1 leader sends the pickled state:
unpickled as is, 0.1's ServiceSpec records would meet today's msgspec classes, which cannot be
built by pickle, and the follower could never install the snapshot). Must not touch: the
journal (its commands are msgpack and are upgraded when applied, shoal.raft.schema), the
network.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.serializer

from shoal.raft.models import to_dict
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_from_plain, state_to_bytes


class _LegacyRecord:
    """Stands in for a schema-1 spec class while a schema-1 dump is unpickled: keeps the
    record's fields as a dict."""

    def __init__(self, *args: Any) -> None:
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.fields = dict(state)


_LEGACY_CLASSES = {"ServiceSpec", "Mount", "PortSpec", "FileRef"}


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "shoal.raft.models" and name in _LEGACY_CLASSES:
            return _LegacyRecord
        return super().find_class(module, name)


class _SnapshotPickle:
    """What pysyncobj's Serializer uses as its ``pickle`` module: its own, except that a load
    reads schema-1 spec records as ``_LegacyRecord`` (the store's ``_deserialize`` then
    upgrades the state). Today's snapshots hold no class of ours, so they load the same."""

    dump = staticmethod(pysyncobj_pickle.dump)
    to_bytes = staticmethod(pysyncobj_pickle.to_bytes)

    @staticmethod
    def load(file: Any) -> Any:
        return _LegacyUnpickler(file).load()


def read_legacy_snapshots() -> None:
    """Make pysyncobj read received snapshots (and dumps) with ``_SnapshotPickle`` (once per
    process; RaftStore calls it before starting pysyncobj)."""
    pysyncobj.serializer.pickle = _SnapshotPickle


def _plain(value: Any) -> Any:
    if isinstance(value, _LegacyRecord):
        return {k: _plain(v) for k, v in value.fields.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def migrate_dump(path: Path) -> bool:
    """Rewrite a pysyncobj dump whose state was pickled by schema 1 in today's format (the
    state as msgpack bytes, see ReplicatedState), before pysyncobj reads it. The original is
    kept as ``raft.dump.schema1``. Returns True if it migrated something. A dump that is not
    schema 1 (or unreadable: the store's persistence check deals with that) is left alone."""
    if not path.exists():
        return False
    try:
        with gzip.open(path, "rb") as f:
            dump = _LegacyUnpickler(f).load()
        consumers = dump[0]
        data = consumers[1]
        old = data["state"]
    except Exception:
        return False
    state = upgrade_state(old)
    consumers[1] = {"state_v2": state_to_bytes(state)}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        pickle.dump(dump, g, protocol=2)
    backup = path.with_name(path.name + ".schema1")
    tmp = path.with_name(path.name + ".migrating")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    if not backup.exists():
        os.link(path, backup)
    os.replace(tmp, path)
    return True


def upgrade_state(old: Any) -> ClusterState:
    """A ClusterState unpickled from a schema-1 dump (spec records as _LegacyRecord) → a
    ClusterState of today's model, through plain values."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, _LegacyRecord):
            return _plain(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if hasattr(obj, f.name)}
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return to_dict(obj)

    raw = plain(old)
    return state_from_plain(raw)
