"""This node's build cache (``shoal image build``'s) and ``shoal builder prune``.

Owns: the records of ``DATA_DIR/build`` a build reuses — the step cache ``cache.json``
(``StepCache``: cache key -> the image that step made, its parent, when it was made and
last hit), the RUN ``--mount=type=cache`` directories ``cache/<key>/`` (made and locked by
shoal.runtime.buildmounts, which keeps their ids in ``cache-ids.json``; a directory's mtime
is when a RUN last let it go) — what those records hold and weigh (``usage``), which of them
a prune takes (``choose``, pure), the prune itself (``prune``) and the images running builds
stand on (``holding``/``held_images``, re-exported from shoal.runtime.heldimages: a prune
leaves them). Must not touch: the image
store's files (an intermediate image goes through ``ImageStore.delete_unused``, which keeps
a tagged or used one), a cache directory a RUN uses (``buildmounts.take_cache`` refuses),
the steps of a build (shoal.runtime.build).

What a prune takes (BuildKit's, as Docker 23+'s ``docker builder prune``): the records no
running build uses; without ``all`` only the *dangling* ones — every cache mount, and the
step records that are not *shared*: a step record is shared when its image's layers are the
first layers of (or all of) an image kept anyway (tagged, or wanted by a task of this node),
so the cache of the build that made the current ``app:1`` stays and the steps of its older
builds go. With ``all``: every step record too (an image a tag or a task still uses stays in
the store; only the cache record goes). Filters: ``until=`` (a Go duration before now, or a
timestamp: Unix seconds, RFC 3339) keeps what was used since; ``id=`` takes only the records
whose id starts with the value (or a cache mount of that ``id=``); ``keep_storage`` stops
once the build cache weighs no more than that many bytes, least recently used first.

A record's size is what removing it alone frees: a step record its image's manifest and the
layers no image outside the cache has, each counted once (at the record whose image has the
fewest layers: the step that made it); a cache mount its directory's disk usage. "Total
reclaimed space" is what the removals did free.

Crash-safe order: the step records go first (``cache.json`` replaced whole), then each
cache mount is renamed into ``tmp/`` and deleted there (what a prune killed midway left
goes at the agent's next start with the rest of ``tmp/``: shoal.node.buildnet's
``remove_cut_short``), then the images (``ImageStore``'s own crash-safe removal; one a
killed prune left is dangling, for the image GC or ``image prune``).

Errors: ``BuildError`` (shoal.runtime.errors) with ``field="filters"`` for a bad filter.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.runtime.buildmounts import CACHE_IDS as CACHE_IDS
from shoal.runtime.buildmounts import cache_names, take_cache
from shoal.runtime.errors import BuildError, ImageError
from shoal.runtime.heldimages import held_images as held_images
from shoal.runtime.heldimages import holding as holding
from shoal.runtime.images import ImageInfo, ImageStore

STEP = "regular"  # a step's result (BuildKit's record type names)
MOUNT = "exec.cachemount"  # a RUN --mount=type=cache directory

# ------------------------------------------------------------------------------ step cache


class StepCache:
    """``DATA_DIR/build/cache.json``: ``{key: {"image", "parent", "created", "used"}}``
    (an older ``{key: image}`` is read with the file's time for both times). Written
    whole, atomically (a rename); call it from one thread (the builds' event loop)."""

    def __init__(self, build_dir: Path) -> None:
        self.path = Path(build_dir) / "cache.json"

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
            when = self.path.stat().st_mtime
        except (OSError, ValueError):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for key, rec in (raw.items() if isinstance(raw, dict) else []):
            if isinstance(rec, str):
                rec = {"image": rec}
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                continue
            try:
                created = float(rec.get("created", when))
                used = float(rec.get("used", created))
            except (TypeError, ValueError):
                created = used = when
            out[str(key)] = {"image": rec["image"], "parent": str(rec.get("parent", "")),
                             "created": created, "used": used}
        return out

    def _save(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        tmp = self.path.with_name(f"cache.json.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(records, indent=0, sort_keys=True))
        os.replace(tmp, self.path)

    def get(self, key: str) -> str | None:
        rec = self.load().get(key)
        return rec["image"] if rec is not None else None

    def touch(self, key: str, now: float | None = None) -> None:
        """A hit: the record's last use is now."""
        records = self.load()
        if key in records:
            records[key]["used"] = time.time() if now is None else now
            self._save(records)

    def put(self, key: str, image_id: str, parent: str) -> None:
        records = self.load()
        now = time.time()
        records[key] = {"image": image_id, "parent": parent, "created": now, "used": now}
        self._save(records)

    def drop(self, keys: Sequence[str]) -> None:
        records = self.load()
        if any(k in records for k in keys):
            for key in keys:
                records.pop(key, None)
            self._save(records)


# ---------------------------------------------------------------------------------- usage


@dataclass
class Record:
    """One build-cache record, as ``docker buildx du`` lists them."""

    id: str  # a step record: its cache key; a cache mount: its directory's name
    type: str  # STEP | MOUNT
    description: str
    size: int  # bytes removing this record alone frees (see the module docstring)
    created: float  # Unix time
    last_used: float
    shared: bool = False  # (a step) its layers are part of an image kept anyway
    in_use: bool = False  # a running build uses it: never pruned
    image: str = ""  # (a step) the image it made ("" when that image is gone)
    name: str = ""  # (a cache mount) its id= (or its target, without an id)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "description": self.description,
                "size": self.size, "created": self.created, "last_used": self.last_used,
                "shared": self.shared, "in_use": self.in_use}


def _disk_usage(path: Path) -> int:
    """Bytes a directory tree takes on disk (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _blob_size(store: ImageStore, digest: str) -> int:
    try:
        return store.blob_path(digest).stat().st_size
    except (OSError, ImageError):  # (gone meanwhile: nothing to free)
        return 0


def usage(store: ImageStore, build_dir: Path, held: AbstractSet[str] = frozenset(),
          wanted: AbstractSet[str] = frozenset(), busy: AbstractSet[str] = frozenset()
          ) -> list[Record]:
    """Every record of the build cache in ``build_dir`` (blocking: call it in a thread);
    ``held``: images running builds use, ``wanted``: images tasks of this node need (kept
    anyway), ``busy``: cache directories RUNs use (``buildmounts.busy_caches()``)."""
    build_dir = Path(build_dir)
    images: dict[str, ImageInfo] = {i.id: i for i in store.ls()}
    steps = StepCache(build_dir).load()
    cached = {r["image"] for r in steps.values() if r["image"] in images}
    kept = {i for i, info in images.items() if any("@" not in t for t in info.tags)}
    kept |= (set(wanted) | set(held)) & set(images)
    outside: set[str] = set()  # layers some image outside the cache has
    for image_id in (kept | (set(images) - cached)):
        outside.update(images[image_id].layers)
    prefixes = {images[i].layers[:n] for i in kept for n in range(len(images[i].layers) + 1)}
    # each cache-only layer counted at the step record whose image has the fewest layers
    owner: dict[str, str] = {}
    order = sorted(steps, key=lambda k: (len(images[steps[k]["image"]].layers)
                                         if steps[k]["image"] in images else 0,
                                         steps[k]["created"], k))
    counted_images: set[str] = set()
    out: list[Record] = []
    for key in order:
        rec = steps[key]
        info = images.get(rec["image"])
        size = 0
        if info is not None:
            if info.id not in kept and info.id not in counted_images:
                counted_images.add(info.id)
                size += _blob_size(store, info.id)
            for digest in info.layers:
                if digest not in outside and digest not in owner:
                    owner[digest] = key
                    size += _blob_size(store, digest)
        out.append(Record(
            id=key, type=STEP, size=size, created=rec["created"], last_used=rec["used"],
            shared=info is not None and info.layers in prefixes,
            in_use=info is not None and info.id in held, image=info.id if info else "",
            description=(f"step result {info.id[7:19]}" if info is not None
                         else f"step result {rec['image'][7:19]} (image gone)")))
    names = cache_names(build_dir)
    cache_root = build_dir / "cache"
    for entry in sorted(os.scandir(cache_root) if cache_root.is_dir() else [],
                        key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            st = os.stat(entry.path, follow_symlinks=False)
            name = names.get(entry.name, {}).get("id", "")
            out.append(Record(
                id=entry.name, type=MOUNT, size=_disk_usage(Path(entry.path)),
                created=float(names.get(entry.name, {}).get("created", st.st_mtime)),
                last_used=st.st_mtime, in_use=entry.path in busy, name=name,
                description=f"cache mount {name}" if name else "cache mount"))
    return out


# -------------------------------------------------------------------------------- choice


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FILTERS = ("until", "id")


@dataclass(frozen=True)
class Filters:
    until: float | None = None  # Unix time: only records last used before it
    ids: tuple[str, ...] = ()  # only records whose id starts with one (or a mount's id=)


def _until(value: str, now: float) -> float:
    """``until``'s value as a Unix time: a Go duration before ``now`` (``24h``, ``1h30m``),
    or a timestamp (Unix seconds, RFC 3339 / ISO 8601; the node's local time unless it
    gives a zone)."""
    text = value.strip()
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if text and pos == len(text):
        return now - seconds
    with contextlib.suppress(ValueError):
        return float(text)
    with contextlib.suppress(ValueError):
        # (a time without a zone is the node's local time, as docker's daemon reads it)
        return datetime.datetime.fromisoformat(text).timestamp()
    raise BuildError(f"filter until: invalid value {value!r} (a duration such as 24h or "
                     "1h30m, or a timestamp: Unix seconds or 2006-01-02T15:04:05Z)",
                     field="filters")


def parse_filters(items: Sequence[str], now: float | None = None) -> Filters:
    """``--filter KEY=VALUE`` items (``until``, ``id``); BuildError naming the bad one."""
    now = time.time() if now is None else now
    until: float | None = None
    ids: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTERS:
            raise BuildError(f"filter {item!r}: expected one of {', '.join(FILTERS)} as "
                             "KEY=VALUE", field="filters")
        if not value:
            raise BuildError(f"filter {key}: empty value", field="filters")
        if key == "until":
            cut = _until(value, now)
            until = cut if until is None else min(until, cut)
        else:
            ids.append(value)
    return Filters(until, tuple(ids))


def choose(records: Sequence[Record], all: bool = False, filters: Filters = Filters(),
           keep_storage: int = 0) -> list[Record]:
    """What a prune removes (pure): records no build uses, dangling ones only unless
    ``all``, that ``filters`` take; with ``keep_storage`` (bytes), the least recently used
    of those until the whole cache weighs no more than that."""
    def taken(r: Record) -> bool:
        if r.in_use or (r.shared and not all):
            return False
        if filters.until is not None and r.last_used >= filters.until:
            return False
        return not filters.ids or any(r.id.startswith(v) or (r.name and r.name == v)
                                      for v in filters.ids)

    out = [r for r in records if taken(r)]
    if keep_storage <= 0:
        return out
    total = sum(r.size for r in records)
    chosen: list[Record] = []
    for r in sorted(out, key=lambda r: (r.last_used, r.id)):
        if total <= keep_storage:
            break
        chosen.append(r)
        total -= r.size
    return chosen


# --------------------------------------------------------------------------------- prune


@dataclass
class PruneResult:
    deleted: list[str] = field(default_factory=list)  # the record ids removed
    reclaimed: int = 0  # bytes freed

    def view(self) -> dict[str, Any]:
        return {"deleted": self.deleted, "reclaimed": self.reclaimed}


async def prune(store: ImageStore, build_dir: Path, all: bool = False,
                filters: Filters = Filters(), keep_storage: int = 0,
                wanted: AbstractSet[str] = frozenset()) -> PruneResult:
    """Remove what ``choose`` takes (call it on the event loop the builds run on: what is
    in use is read there, and a cache directory is taken from under the RUNs' feet only
    there); ``wanted``: images tasks of this node need."""
    import asyncio

    from shoal.runtime.buildmounts import busy_caches

    held = held_images()
    records = await asyncio.to_thread(usage, store, build_dir, held, wanted, busy_caches())
    chosen = choose(records, all, filters, keep_storage)
    result = PruneResult()
    steps = [r for r in chosen if r.type == STEP]
    StepCache(build_dir).drop([r.id for r in steps])  # (no build hits them from now on)
    result.deleted += [r.id for r in steps]
    taken: list[Path] = []
    tmp = Path(build_dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    for r in chosen:
        if r.type != MOUNT:
            continue
        trash = tmp / f"trash-cache-{r.id}-{secrets.token_hex(4)}"
        if take_cache(Path(build_dir) / "cache" / r.id, trash):  # (not if a RUN took it)
            taken.append(trash)
            result.deleted.append(r.id)
    keep = set(wanted) | held_images()
    remaining = {rec["image"] for rec in StepCache(build_dir).load().values()}
    gone_images = sorted({r.image for r in steps if r.image} - remaining - keep)

    def finish() -> int:
        freed = 0
        for image_id in gone_images:
            with contextlib.suppress(ImageError, OSError):  # (gone meanwhile: nothing freed)
                freed += store.delete_unused(image_id, keep) or 0
        for trash in taken:
            freed += _disk_usage(trash)
            shutil.rmtree(trash, ignore_errors=True)
        return freed

    result.reclaimed = await asyncio.to_thread(finish)
    return result


__all__ = ["CACHE_IDS", "FILTERS", "MOUNT", "STEP", "Filters", "PruneResult", "Record",
           "StepCache", "choose", "held_images", "holding", "parse_filters", "prune", "usage"]
