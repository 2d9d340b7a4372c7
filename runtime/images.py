"""This node's image store: content-addressed layers, rootfs imports, docker-save and OCI loads.

Owns: ``DATA_DIR/images``::

    blobs/sha256/<hex>   blobs named by the sha256 of their bytes: layer tarballs exactly as
                         given (tar, tar.gz, tar.zst) and image manifests (JSON, see below)
    manifests/<hex>      an empty marker per committed (usable) image
    layers/<hex>/        the layer tarball <hex> unpacked, whiteouts in overlayfs form
    repositories.json    tags: {"name:tag": "sha256:<manifest digest>"}
    tmp/                 work in progress (renamed into place when complete)

Must not touch: anything outside it; task directories (the controller mounts the layers
read-only as overlayfs lower dirs inside each task's own mount namespace). No removal
(``rm``, ``prune``, ``gc``, ``delete_unused``) takes an image a task of this node uses (the
``in_use`` hook) or a running build stands on (shoal.runtime.heldimages), checked under the
store's lock.

An image is its **manifest**, a canonical JSON blob
``{"schemaVersion": 1, "layers": [{"digest", "size"}...] (bottom first), "config": {Entrypoint,
Cmd, Env, WorkingDir, User[, Healthcheck]}}``; the image id is the manifest's digest, so the
same content imported twice is the same image, and a peer can fetch an image blob by blob:
``blobs_needed(id)`` -> ``import_blob(digest, stream)`` for each (verified) -> ``commit(id, tags)``.

Layers are unpacked in order, each into its own directory, by shoal.runtime.layers (safe
extraction, whiteouts in overlayfs form, gzip/zstd/plain tar told apart by the content); the
records of an image's config and of a stored image (``ImageConfig``, ``ImageHealthcheck``,
``ImageInfo``) are shoal.runtime.imageconfig's, re-exported here. Registry pulls are
shoal.runtime.registry's: they come in through ``import_blob`` and ``add_image``.

All methods block (disk I/O, hashing, decompression): call them from a thread. They are safe to
call from several threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from shoal.runtime.errors import (
    DigestMismatch,
    ImageError,
    ImageInUse,
    ImageNotFound,
    InvalidImage,
)
from shoal.runtime.heldimages import held_images
from shoal.runtime.imageconfig import ImageConfig as ImageConfig
from shoal.runtime.imageconfig import ImageHealthcheck as ImageHealthcheck
from shoal.runtime.imageconfig import ImageInfo as ImageInfo
from shoal.runtime.layers import GZIP_MAGIC, ZSTD_MAGIC, open_layer
from shoal.runtime.layers import extract_layer as extract_layer
from shoal.runtime.reference import REFERENCE_RE, InvalidReference, parse_reference

_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def _digest_hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not _HEX_RE.fullmatch(hexpart):
        raise ImageError(f"not a sha256 digest: {digest!r}")
    return hexpart


def normalize_ref(ref: str) -> str:
    """The store's tag for a reference (Docker's grammar, shoal.runtime.reference), in the
    familiar form: "name" -> "name:latest", "docker.io/library/x:1" -> "x:1",
    "reg:5000/app:1@sha256:..." -> "reg:5000/app@sha256:..." (a digest wins over a tag)."""
    try:
        r = parse_reference(ref)
    except InvalidReference as exc:
        raise ImageError(f"not an image name: {ref!r} ({exc})") from None
    if r.digest:
        return f"{r.familiar_name}@{r.digest}"
    return f"{r.familiar_name}:{r.tag}"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _HashingReader(io.RawIOBase):
    """Reads through to ``raw``, hashing what passes, optionally copying it to ``sink``."""

    def __init__(self, raw: IO[bytes], sink: IO[bytes] | None = None) -> None:
        self.raw, self.sink = raw, sink
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.size += n
        if self.sink is not None:
            self.sink.write(data)
        return n


@dataclass(frozen=True)
class ImageGCConfig:
    """The image garbage collection of a node (Kubernetes' kubelet image GC). Images used by
    a task on the node, or wanted by the cluster there, are never collected."""

    # percent of the image store's filesystem in use at or above which unused images are
    # removed, least recently used first (kubelet: imageGCHighThresholdPercent = 85);
    # 100 or more: never for disk space
    high_percent: float = 85.0
    # ... until usage is below this percent (kubelet: imageGCLowThresholdPercent = 80)
    low_percent: float = 80.0
    # seconds: an image unused for longer is removed whatever the disk usage (kubelet:
    # imageMaximumGCAge); 0 = never for age (the default, as the kubelet's)
    max_age: float = 0.0
    # seconds: an image used or pulled more recently is never collected (kubelet:
    # imageMinimumGCAge = 2m): a just-pulled image is not removed before its task starts
    min_age: float = 120.0
    # seconds between two passes of the agent's collector; 0 = no automatic collection
    interval: float = 300.0
    # bytes of build cache (shoal.runtime.buildcache's records: step results, RUN cache
    # mounts) each pass keeps at most: above it, records unused for min_age go, least
    # recently used first, the dangling ones before the others (`builder prune
    # --keep-storage`; BuildKit's GC). -1: BuildKit's default, 10 % of the filesystem
    # holding DATA_DIR/build rounded up to a whole GB (2 GB if unknown); 0: no bound
    build_cache_keep: int = -1

    def validate(self) -> None:
        if not 0 < self.low_percent <= self.high_percent:
            raise ValueError("image GC: 0 < low_percent <= high_percent is required")
        if self.max_age < 0 or self.min_age < 0 or self.interval < 0:
            raise ValueError("image GC: ages and interval cannot be negative")
        if self.build_cache_keep < -1:
            raise ValueError("image GC: build_cache_keep is bytes, 0 (no bound) or -1 (10 % "
                             "of the disk)")


class ImageStore:
    """See the module docstring."""

    def __init__(self, root: Path, in_use: Callable[[], set[str]] = set,
                 zstd_path: str = "zstd") -> None:  # fmt: skip
        self.root = Path(root)
        self._in_use = in_use
        self._zstd = zstd_path
        self._lock = threading.RLock()
        self._blobs = self.root / "blobs" / "sha256"
        self._layers = self.root / "layers"
        self._tmp = self.root / "tmp"
        self._manifests = self.root / "manifests"  # one empty marker per committed image
        for d in (self._blobs, self._layers, self._tmp, self._manifests):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for left in self._tmp.glob("trash-*"):  # a removal cut short by a crash
            _rmtree(left)

    def _used(self) -> set[str]:
        """The images no removal takes: those tasks of this node use (the ``in_use`` hook)
        and those running builds of this process stand on (their base, cache hits and
        results so far: without them a build's next step lacks its layers)."""
        return set(self._in_use()) | held_images()

    # ------------------------------------------------------------------------------ queries

    def _repos(self) -> dict[str, str]:
        try:
            raw = json.loads((self.root / "repositories.json").read_text())
            return {str(k): str(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            raise ImageError(f"unreadable repositories.json: {exc}") from exc

    def _save_repos(self, repos: Mapping[str, str]) -> None:
        tmp = self.root / "repositories.json.tmp"
        tmp.write_text(json.dumps(dict(sorted(repos.items())), indent=1))
        os.replace(tmp, self.root / "repositories.json")

    def _manifest(self, image_id: str) -> dict[str, Any]:
        try:
            raw = json.loads((self._blobs / _digest_hex(image_id)).read_bytes())
        except FileNotFoundError:
            raise ImageNotFound(f"no image {image_id}") from None
        except (OSError, ValueError) as exc:
            raise ImageError(f"unreadable manifest {image_id}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list):
            raise InvalidImage(f"blob {image_id} is not an image manifest")
        return raw

    def _info(self, image_id: str, repos: Mapping[str, str]) -> ImageInfo:
        man = self._manifest(image_id)
        layers = tuple(str(layer["digest"]) for layer in man["layers"])
        return ImageInfo(
            id=image_id,
            tags=tuple(sorted(t for t, i in repos.items() if i == image_id)),
            layers=layers,
            size=sum(int(layer.get("size", 0)) for layer in man["layers"]),
            config=ImageConfig.from_json(man.get("config")),
        )

    def _images(self) -> set[str]:
        """Ids of every committed image (tagged or not): manifests/<hex> markers."""
        return {f"sha256:{p.name}" for p in self._manifests.iterdir() if _HEX_RE.fullmatch(p.name)}

    def ls(self) -> list[ImageInfo]:
        """Every image on this node (tagged ones and ones pulled by id)."""
        with self._lock:
            repos = self._repos()
            return sorted((self._info(i, repos) for i in self._images()),
                          key=lambda info: (info.tags, info.id))  # fmt: skip

    def inspect(self, ref: str) -> ImageInfo:
        """The image a reference names: "name[:tag]", "sha256:<hex>" or an id prefix (>= 4
        hex digits, unique). Raise ImageNotFound."""
        with self._lock:
            repos = self._repos()
            return self._info(self._resolve_id(ref, repos), repos)

    resolve = inspect

    def _resolve_id(self, ref: str, repos: Mapping[str, str]) -> str:
        if ref.startswith("sha256:"):
            if (self._manifests / _digest_hex(ref)).exists():
                return ref
            raise ImageNotFound(f"no image {ref}")
        with contextlib.suppress(ImageError):
            tag = normalize_ref(ref)
            if tag in repos:
                return repos[tag]
        if re.fullmatch(r"[0-9a-f]{4,64}", ref):
            matches = [i for i in self._images() if i[7:].startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ImageNotFound(f"ambiguous image id prefix {ref}")
        raise ImageNotFound(f"no image {ref}")

    def layer_dirs(self, info: ImageInfo) -> list[Path]:
        """The unpacked layers of an image, top first (overlayfs lowerdir order)."""
        dirs = [self._layers / _digest_hex(d) for d in reversed(info.layers)]
        for d in dirs:
            if not d.is_dir():
                raise ImageNotFound(f"layer {d.name} of {info.id} is not unpacked")
        with contextlib.suppress(OSError):  # last used: what the GC's ages count from
            os.utime(self._manifests / _digest_hex(info.id))
        return dirs

    # -------------------------------------------------------------------------------- blobs

    def has_blob(self, digest: str) -> bool:
        return (self._blobs / _digest_hex(digest)).is_file()

    def blob_path(self, digest: str) -> Path:
        """The stored blob's file (read it only). ImageNotFound when it is not here."""
        path = self._blobs / _digest_hex(digest)
        if not path.is_file():
            raise ImageNotFound(f"no blob {digest}")
        return path

    def tag(self, ref: str, target: str) -> ImageInfo:
        """Tag the image ``ref`` names as ``target`` too (docker's ``image tag``); a tag
        that named another image moves. ImageNotFound for ``ref``; ImageError for a bad
        ``target``, or one with a digest (only the image with that digest may answer it)."""
        with self._lock:
            repos = self._repos()
            image_id = self._resolve_id(ref, repos)
            tag = normalize_ref(target)
            if "@" in tag:
                raise ImageError(f"refusing to tag with a digest reference: {target}")
            repos[tag] = image_id
            self._save_repos(repos)
            return self._info(image_id, repos)

    def export_blob(self, digest: str) -> BinaryIO:
        """An open binary file with the blob's content (the caller closes it)."""
        try:
            return (self._blobs / _digest_hex(digest)).open("rb")
        except FileNotFoundError:
            raise ImageNotFound(f"no blob {digest}") from None

    def import_blob(self, digest: str, stream: IO[bytes]) -> int:
        """Store a blob read from ``stream``, verifying it hashes to ``digest``; return its
        size. Raise DigestMismatch (nothing stored) if it does not."""
        hexpart = _digest_hex(digest)
        if self.has_blob(digest):
            return (self._blobs / hexpart).stat().st_size
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        sha = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if sha.hexdigest() != hexpart:
                raise DigestMismatch(f"blob announced as {digest} is sha256:{sha.hexdigest()}")
            os.replace(tmp, self._blobs / hexpart)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return size

    def _store_file(self, path: Path | IO[bytes], expect: str | None = None) -> tuple[str, int]:
        """Copy a file into the blob store; return (digest, size)."""
        if isinstance(path, Path):
            with path.open("rb") as fh:
                return self._store_file(fh, expect)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                reader = _HashingReader(path, out)
                while reader.read(_CHUNK):
                    pass
            digest = f"sha256:{reader.sha.hexdigest()}"
            if expect is not None and digest != expect:
                raise DigestMismatch(f"layer announced as {expect} is {digest}")
            os.replace(tmp, self._blobs / digest[7:])
            return digest, reader.size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _store_bytes(self, data: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        path = self._blobs / digest[7:]
        if not path.exists():
            tmp = self._tmp / f"m-{digest[7:]}-{threading.get_ident()}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def blobs_needed(self, image_id: str) -> list[str]:
        """What this store lacks to commit ``image_id``: the manifest itself if missing, else
        the missing layer blobs (empty: ready to commit)."""
        if not self.has_blob(image_id):
            return [image_id]
        man = self._manifest(image_id)
        return [str(layer["digest"]) for layer in man["layers"]
                if not self.has_blob(str(layer["digest"]))]  # fmt: skip

    def commit(self, image_id: str, tags: Sequence[str] = ()) -> ImageInfo:
        """Make an image whose blobs are all here usable: unpack its layers, tag it."""
        missing = self.blobs_needed(image_id)
        if missing:
            raise ImageNotFound(f"image {image_id} lacks blobs: {', '.join(missing)}")
        man = self._manifest(image_id)
        for layer in man["layers"]:
            self._unpack(str(layer["digest"]))
        (self._manifests / _digest_hex(image_id)).touch()
        with self._lock:
            repos = self._repos()
            for tag in tags:
                repos[normalize_ref(tag)] = image_id
            self._save_repos(repos)
            return self._info(image_id, repos)

    # ------------------------------------------------------------------------------ imports

    def add_image(self, layers: Sequence[tuple[str, int]], config: ImageConfig,
                  tags: Sequence[str] = ()) -> ImageInfo:
        """An image from layer blobs already in the store (``import_blob``), bottom first,
        and its config (a registry pull): written as one manifest, committed, tagged. The
        same layers and config give the same image id on every node."""
        missing = [d for d, _ in layers if not self.has_blob(d)]
        if missing:
            raise ImageNotFound(f"layers not in the store: {', '.join(missing)}")
        return self._new_image([(d, int(s)) for d, s in layers], config, tags)

    def _new_image(
        self, layers: list[tuple[str, int]], config: ImageConfig, tags: Sequence[str]
    ) -> ImageInfo:
        manifest = {
            "schemaVersion": 1,
            "layers": [{"digest": d, "size": s} for d, s in layers],
            "config": config.to_json(),
        }
        image_id = self._store_bytes(_canonical(manifest))
        return self.commit(image_id, tags)

    def import_rootfs(self, ref: str, path: str | Path) -> ImageInfo:
        """An image of one layer from a root filesystem: a directory, or a tarball (.tar,
        .tar.gz, .tar.zst; compression detected from the content). No config (the service
        spec gives the command)."""
        tag = normalize_ref(ref)
        src = Path(path)
        if src.is_dir():
            fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="rootfs-", suffix=".tar")
            os.close(fd)
            try:
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    for entry in sorted(src.iterdir()):
                        tar.add(entry, arcname=entry.name, recursive=True)
                layer = self._store_file(Path(tmp))
            except OSError as exc:
                raise InvalidImage(f"cannot archive {src}: {exc}") from exc
            finally:
                os.unlink(tmp)
        elif src.is_file():
            layer = self._store_file(src)
        else:
            raise InvalidImage(f"no such file or directory: {src}")
        return self._new_image([layer], ImageConfig(), [tag])

    def load(self, path: str | Path) -> list[ImageInfo]:
        """Images from a ``docker save`` tarball or an OCI image-layout tarball, with their
        tags and configs (Entrypoint, Cmd, Env, WorkingDir, User). Layer digests are verified
        where the archive states them."""
        try:
            with tarfile.open(path, "r:*") as outer:
                names = {m.name.removeprefix("./"): m for m in outer.getmembers()}
                if "manifest.json" in names:
                    return self._load_docker(outer, names)
                if "index.json" in names:
                    return self._load_oci(outer, names)
        except (tarfile.TarError, OSError) as exc:
            raise InvalidImage(f"cannot read {path}: {exc}") from exc
        raise InvalidImage(f"{path}: neither a docker-save archive nor an OCI image layout")

    @staticmethod
    def _member(outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo], name: str
                ) -> IO[bytes]:  # fmt: skip
        member = names.get(posixpath.normpath(name).removeprefix("./"))
        fh = outer.extractfile(member) if member is not None and member.isfile() else None
        if fh is None:
            raise InvalidImage(f"the archive lacks {name}")
        return fh

    def _json_member(self, outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo],
                     name: str) -> Any:  # fmt: skip
        try:
            return json.loads(self._member(outer, names, name).read(16 << 20))
        except ValueError as exc:
            raise InvalidImage(f"{name}: not JSON: {exc}") from exc

    def _load_docker(self, outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo]
                     ) -> list[ImageInfo]:  # fmt: skip
        manifest = self._json_member(outer, names, "manifest.json")
        if not isinstance(manifest, list):
            raise InvalidImage("manifest.json: expected a list")
        out = []
        for entry in manifest:
            try:
                config = self._json_member(outer, names, str(entry["Config"]))
                layer_paths = [str(p) for p in entry["Layers"]]
                tags = [str(t) for t in entry.get("RepoTags") or ()]
                diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
            except (KeyError, TypeError, AttributeError) as exc:
                raise InvalidImage(f"manifest.json: malformed entry: {exc}") from exc
            layers = []
            for i, lp in enumerate(layer_paths):
                # The path names the digest in OCI-style archives (blobs/sha256/<hex>); legacy
                # ones (<id>/layer.tar) are uncompressed, so the config's diff_id is theirs.
                m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", lp)
                expect = f"sha256:{m.group(1)}" if m else None
                fh = self._member(outer, names, lp)
                digest, size = self._store_file(fh, expect)
                if expect is None and i < len(diff_ids) and diff_ids[i] != digest:
                    head = self.export_blob(digest).read(4)
                    if not head.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
                        raise DigestMismatch(f"layer {lp} is {digest}, config says {diff_ids[i]}")
                layers.append((digest, size))
            out.append(self._new_image(layers, ImageConfig.from_json(config.get("config")), tags))
        return out

    def _load_oci(self, outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo]
                  ) -> list[ImageInfo]:  # fmt: skip
        index = self._json_member(outer, names, "index.json")
        out = []
        for desc in index.get("manifests", []) if isinstance(index, dict) else []:
            man_desc = self._pick_platform(outer, names, desc)
            annotations = desc.get("annotations") or {}
            name = annotations.get("io.containerd.image.name") or annotations.get(
                "org.opencontainers.image.ref.name", ""
            )
            tags = [name] if name and REFERENCE_RE.fullmatch(name) else []
            man = self._verified_json(outer, names, str(man_desc["digest"]))
            config = self._verified_json(outer, names, str(man["config"]["digest"]))
            layers = []
            for layer in man.get("layers", []):
                digest = str(layer["digest"])
                fh = self._member(outer, names, f"blobs/sha256/{_digest_hex(digest)}")
                layers.append(self._store_file(fh, digest))
            out.append(self._new_image(layers, ImageConfig.from_json(config.get("config")), tags))
        if not out:
            raise InvalidImage("index.json lists no image")
        return out

    def _verified_json(self, outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo],
                       digest: str) -> Any:  # fmt: skip
        data = self._member(outer, names, f"blobs/sha256/{_digest_hex(digest)}").read(16 << 20)
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise DigestMismatch(f"blob {digest} does not match its digest")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidImage(f"blob {digest}: not JSON") from exc

    def _pick_platform(self, outer: tarfile.TarFile, names: Mapping[str, tarfile.TarInfo],
                       desc: Any) -> Any:  # fmt: skip
        """Follow nested indexes (multi-platform images) to this host's linux/<arch>."""
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        for _ in range(4):
            if "index" not in str(desc.get("mediaType", "")) and "list" not in str(
                desc.get("mediaType", "")
            ):
                return desc
            nested = self._verified_json(outer, names, str(desc["digest"]))
            candidates = nested.get("manifests", [])
            chosen = [m for m in candidates
                      if (m.get("platform") or {}).get("architecture") == arch]  # fmt: skip
            if not chosen:
                raise InvalidImage(f"no linux/{arch} image in the index")
            desc = chosen[0]
        raise InvalidImage("index nesting too deep")

    # --------------------------------------------------------------------------- removal

    def rm(self, ref: str) -> None:
        """Untag ``ref`` (a tag) or remove the image (an id: all its tags). An image left with no
        tag is deleted with its layers and blobs no other image uses. ImageInUse if a task on this
        node uses it (nothing changes), ImageNotFound if unknown."""
        with self._lock:
            repos = self._repos()
            image_id = self._resolve_id(ref, repos)
            is_tag = not ref.startswith("sha256:") and normalize_ref_safe(ref) in repos
            drop = [normalize_ref(ref)] if is_tag else [t for t, i in repos.items()
                                                        if i == image_id]  # fmt: skip
            remaining = [t for t, i in repos.items() if i == image_id and t not in drop]
            if not remaining and image_id in self._used():
                raise ImageInUse(f"image {ref} is used by a task or a running build on this "
                                 "node")
            for t in drop:
                del repos[t]
            self._save_repos(repos)
            if remaining:
                return
            self._delete(image_id)

    def _delete(self, image_id: str) -> int:
        """Delete an untagged image and the layers no other image uses; return the bytes of
        blobs freed. Crash-safe order: the marker goes first (the image is no longer usable,
        so nothing starts from it), then each layer directory is renamed into tmp/ (atomic:
        a layer directory is whole or absent) before its blob is unlinked and the renamed
        directory deleted; leftovers in tmp/ are swept when the store opens. A later pull
        finds either a whole layer or none, and re-fetches what is missing."""
        with self._lock:
            man = self._manifest(image_id)
            with contextlib.suppress(FileNotFoundError):
                (self._manifests / _digest_hex(image_id)).unlink()
            keep: set[str] = set()
            for other in self._images() - {image_id}:
                keep.update(str(layer["digest"]) for layer in self._manifest(other)["layers"])
            freed = 0
            for layer in man["layers"]:
                digest = str(layer["digest"])
                if digest in keep:
                    continue
                hexpart = _digest_hex(digest)
                trash = self._tmp / f"trash-{hexpart[:12]}-{os.urandom(4).hex()}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._layers / hexpart, trash)
                with contextlib.suppress(FileNotFoundError):
                    blob = self._blobs / hexpart
                    freed += blob.stat().st_size
                    blob.unlink()
                _rmtree(trash)
            with contextlib.suppress(FileNotFoundError):
                (self._blobs / _digest_hex(image_id)).unlink()
            return freed

    def delete_unused(self, image_id: str, keep: set[str] | frozenset[str] = frozenset()
                      ) -> int | None:
        """Delete an image no tag names, no task uses and not in ``keep`` (a build's
        intermediate image: `builder prune`); the bytes freed (its manifest, the layers no
        other image uses), or None when it is tagged, used or not here (nothing changes):
        checked and done under the store's lock, so a tag given meanwhile keeps it."""
        with self._lock:
            if image_id not in self._images() or image_id in self._repos().values() \
                    or image_id in keep or image_id in self._used():
                return None
            try:
                size = (self._blobs / _digest_hex(image_id)).stat().st_size
            except FileNotFoundError:
                size = 0
            return self._delete(image_id) + size

    def last_used(self, image_id: str) -> float:
        """When a task last started from the image, or it was committed (Unix time)."""
        try:
            return (self._manifests / _digest_hex(image_id)).stat().st_mtime
        except FileNotFoundError:
            raise ImageNotFound(f"no image {image_id}") from None

    def prune(self, all: bool = False, until: float | None = None,
              wanted: set[str] | frozenset[str] = frozenset(),
              now: float | None = None) -> dict[str, Any]:
        """`image prune`: remove the images no task uses (``wanted`` adds image ids the
        cluster wants on this node, e.g. tasks still to start) — only those without a
        ``name:tag`` (dangling) unless ``all``; with ``until`` only those unused for at least
        that many seconds. Returns ``{"deleted": [ids], "reclaimed": bytes}``."""
        now = time.time() if now is None else now
        deleted: list[str] = []
        reclaimed = 0
        with self._lock:
            repos = self._repos()
            keep = self._used() | set(wanted)
            for image_id in sorted(self._images()):
                tags = [t for t, i in repos.items() if i == image_id]
                if image_id in keep or (not all and any("@" not in t for t in tags)):
                    continue
                if until is not None and now - self.last_used(image_id) < until:
                    continue
                for t in tags:
                    del repos[t]
                self._save_repos(repos)
                reclaimed += self._delete(image_id)
                deleted.append(image_id)
        return {"deleted": deleted, "reclaimed": reclaimed}

    def gc(self, config: ImageGCConfig, wanted: set[str] | frozenset[str] = frozenset(),
           usage: Callable[[], tuple[int, int]] | None = None,
           now: float | None = None) -> dict[str, Any]:
        """One pass of the image garbage collection (see ImageGCConfig): unused images older
        than ``max_age``; then, while the filesystem is fuller than ``high_percent``, unused
        images least recently used first until it is back under ``low_percent``. ``usage``
        returns (total, used) bytes of the store's filesystem (default: statvfs)."""
        now = time.time() if now is None else now
        usage = usage or self.fs_usage
        deleted: list[str] = []
        reclaimed = 0
        with self._lock:
            repos = self._repos()
            keep = self._used() | set(wanted)
            unused = sorted((self.last_used(i), i) for i in self._images() - keep)
            total, used = usage()
            full = total > 0 and 100.0 * used / total >= config.high_percent
            for t, image_id in unused:
                if now - t < config.min_age:
                    continue
                over_age = config.max_age > 0 and now - t >= config.max_age
                if not over_age and not full:
                    continue
                for tag in [k for k, v in repos.items() if v == image_id]:
                    del repos[tag]
                self._save_repos(repos)
                reclaimed += self._delete(image_id)
                deleted.append(image_id)
                if full:  # freeing space: until back under the low mark
                    total, used = usage()
                    full = total > 0 and 100.0 * used / total >= config.low_percent
        return {"deleted": deleted, "reclaimed": reclaimed}

    def fs_usage(self) -> tuple[int, int]:
        """(total, used) bytes of the filesystem holding the store."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        return total, total - st.f_bavail * st.f_frsize

    # ---------------------------------------------------------------------------- unpacking

    def _unpack(self, digest: str) -> Path:
        hexpart = _digest_hex(digest)
        final = self._layers / hexpart
        if final.is_dir():
            return final
        work = Path(tempfile.mkdtemp(dir=self._tmp, prefix=f"layer-{hexpart[:12]}-"))
        try:
            with open_layer(self._blobs / hexpart, self._zstd) as stream:
                extract_layer(stream, work)
            work.chmod(0o755)
            try:
                os.rename(work, final)
            except OSError:
                if not final.is_dir():  # otherwise: another thread unpacked it first
                    raise
        finally:
            if work.exists():
                _rmtree(work)
        return final


def normalize_ref_safe(ref: str) -> str:
    try:
        return normalize_ref(ref)
    except ImageError:
        return ""


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
