"""Writing images of this node's store as one tarball (`shoal image save`, docker save).

Owns: the archive's layout — an OCI image layout (``oci-layout``, ``index.json`` naming each
image's manifest with its reference in the ``io.containerd.image.name`` and
``org.opencontainers.image.ref.name`` annotations, ``blobs/sha256/…``) that also carries
Docker's ``manifest.json`` (``Config``, ``RepoTags``, ``Layers`` as blob paths): the layout
Docker 25's `docker save` writes and `docker load` reads; skopeo (``oci-archive:``,
``docker-archive:``) and `shoal image load` read it (tests/test_registry.py). The images are
what a push would upload (shoal.runtime.regpush: the layer blobs as stored, an OCI config of
what the store keeps). Must not touch: the store's files (only read), anything but the
stream it is given. Blocking: the agent runs it in a thread and streams the tar as it is
written (``mode="w|"``: nothing is kept whole).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import IO

from shoal.runtime.errors import ImageError
from shoal.runtime.images import ImageInfo, ImageStore
from shoal.runtime.reference import REFERENCE_RE, parse_reference
from shoal.runtime.registry import MT_OCI_MANIFEST
from shoal.runtime.regpush import OciImage, oci_image

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _names(ref: str, info: ImageInfo) -> list[str]:
    """The references (the store's tags, familiar) the archive gives an image: the one
    ``ref`` names, else — an id or an id prefix names the image — every tag it has."""
    if ref in info.tags:
        return [ref]
    try:
        named = parse_reference(ref).familiar()
    except ImageError:  # (an id, an id prefix)
        return list(info.tags)
    return [named] if named in info.tags else list(info.tags)


def _tags(names: list[str]) -> list[str]:
    """The names an archive carries: not digest references (``name@sha256:…`` names the
    manifest it was pulled as, not the one written here; docker's RepoTags cannot hold
    one)."""
    return [n for n in names if "@" not in n]


def _annotations(tag: str) -> dict[str, str]:
    """index.json's names of an image (as Docker 25's save: the full name, and the tag)."""
    ref = parse_reference(tag)
    return {"io.containerd.image.name": str(ref), "org.opencontainers.image.ref.name": ref.tag}


@dataclass
class Archive:
    """What an archive will hold: each image as OCI blobs (by image id: an image named
    twice is written once) and the names it gets."""

    images: dict[str, OciImage] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)


def _repository_tags(store: ImageStore, ref: str) -> list[tuple[str, ImageInfo]]:
    """A repository named without a tag or digest (``busybox``): every tag of it in the
    store, each with its image, as docker save takes such a name (``busybox:1.36`` and
    ``busybox:latest`` alike; an image it holds by digest alone is written untagged);
    empty for any other reference (``busybox:latest``, an id)."""
    m = REFERENCE_RE.match(ref)
    if m is None or m.group("tag") or m.group("digest"):
        return []
    try:
        repo = parse_reference(ref).name
    except ImageError:
        return []
    out = []
    for info in store.ls():
        for tag in info.tags:  # (digest references too: ``_tags`` leaves them unnamed)
            try:
                if parse_reference(tag).name == repo:
                    out.append((tag, info))
            except ImageError:  # (the store's tags are its own, parsed when made)
                continue
    return sorted(out, key=lambda pair: pair[0])


def plan(store: ImageStore, refs: list[str],
         platform: tuple[str, str, str] | None = None) -> Archive:
    """The archive of the images ``refs`` name (tags, a repository's every tag, ids or id
    prefixes): each layer is read here (its uncompressed digest), so a missing or
    unreadable image fails now, before a byte is written (ImageNotFound, OSError)."""
    archive = Archive()
    for ref in refs:
        pairs = _repository_tags(store, ref) or [(ref, store.inspect(ref))]
        for name, info in pairs:
            if info.id not in archive.images:
                archive.images[info.id] = oci_image(store, info, platform)
            names = archive.names.setdefault(info.id, [])
            names += [n for n in _names(name, info) if n not in names]
    return archive


def write(store: ImageStore, archive: Archive, out: IO[bytes]) -> None:
    """``archive`` to ``out`` as one tar stream (``mode="w|"``: written as it goes)."""
    images, names = archive.images, archive.names
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
        {"mediaType": MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
         **({"annotations": _annotations(name)} if name else {})}
        for iid, img in images.items() for name in (_tags(names[iid]) or [""])]}
    docker = [{"Config": f"blobs/sha256/{_hex(img.config_digest)}",
               "RepoTags": _tags(names[iid]),
               "Layers": [f"blobs/sha256/{_hex(d)}" for d, _, _ in img.layers]}
              for iid, img in images.items()]
    # (1 MiB records: tarfile's 10 KiB ones each cost the agent a hand-over to its loop)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      bufsize=1 << 20) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", json.dumps(index, separators=(",", ":")).encode())
        _add(tar, "manifest.json", json.dumps(docker, separators=(",", ":")).encode())
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        written: set[str] = set()
        for img in images.values():
            for digest, _, size in img.layers:
                if digest not in written:
                    written.add(digest)
                    member = tarfile.TarInfo(f"blobs/sha256/{_hex(digest)}")
                    member.size, member.mode = size, 0o444
                    with store.blob_path(digest).open("rb") as fh:
                        tar.addfile(member, fh)
            for digest, data in ((img.config_digest, img.config), (img.digest, img.manifest)):
                if digest not in written:
                    written.add(digest)
                    _add(tar, f"blobs/sha256/{_hex(digest)}", data)


def save(store: ImageStore, refs: list[str], out: IO[bytes],
         platform: tuple[str, str, str] | None = None) -> list[OciImage]:
    """``plan`` then ``write``: the images ``refs`` name to ``out``; what was written."""
    archive = plan(store, refs, platform)
    write(store, archive, out)
    return list(archive.images.values())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o444
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


__all__ = ["MT_OCI_INDEX", "Archive", "plan", "save", "write"]
