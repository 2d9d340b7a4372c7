"""Pushing an image of this node's store to a registry (`shoal image push`, docker push).

Owns: turning a stored image (shoal's manifest: layer blobs as they are stored, and the
Docker config) into what a registry serves — an OCI image config (the config, this node's
platform, the layers' uncompressed digests as ``rootfs.diff_ids``) and an OCI image manifest
(each layer's media type from its compression: tar, gzip or zstd) — and uploading the blobs
the registry lacks, then the manifest under the reference's tag. Must not touch: the store's
files (only read: ``ImageStore.blob_path``), credentials (the RegistryClient asks its
callback), anything but the registry the reference names.

An image that came from a registry is pushed with the same layer blobs (same digests: a
registry that has them skips them) but a config of shoal's (the fields shoal keeps), so its
manifest digest differs from the one it was pulled as. Blocking, like the registry client:
the agent runs it in a thread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.runtime.errors import RegistryError
from shoal.runtime.images import ImageInfo, ImageStore
from shoal.runtime.layers import GZIP_MAGIC, ZSTD_MAGIC, open_layer
from shoal.runtime.reference import Reference, parse_reference
from shoal.runtime.registry import MT_OCI_MANIFEST, RegistryClient, host_platform

MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {"tar": "application/vnd.oci.image.layer.v1.tar",
            "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
            "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


@dataclass
class PushResult:
    ref: str  # where it went (familiar form)
    digest: str  # the manifest's digest: `service create --image REF@DIGEST` pins it
    size: int  # bytes of the manifest
    blobs: list[tuple[str, str]] = field(default_factory=list)  # (digest, "pushed"|"exists")

    def to_json(self) -> dict[str, object]:
        return {"ref": self.ref, "digest": self.digest, "size": self.size,
                "blobs": [{"digest": d, "status": s} for d, s in self.blobs]}


def target_reference(info: ImageInfo, target: str) -> Reference:
    """The reference to push to: ``target`` with its tag (latest when it has none).
    RegistryError for a digest reference (a push names a tag)."""
    ref = parse_reference(target)
    if ref.digest:
        raise RegistryError(f"push to a tag, not a digest: {target} ({info.id[:19]})")
    return ref


def layer_kind(store: ImageStore, digest: str) -> str:
    """"gzip", "zstd" or "tar", from the stored blob's first bytes."""
    with store.blob_path(digest).open("rb") as fh:
        head = fh.read(4)
    return "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) \
        else "tar"


def diff_id(store: ImageStore, digest: str) -> str:
    """The sha256 of the layer's uncompressed tar (the config's ``rootfs.diff_ids``)."""
    h = hashlib.sha256()
    with open_layer(store.blob_path(digest)) as tar:
        while chunk := tar.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def oci_config(info: ImageInfo, diff_ids: list[str],
               platform: tuple[str, str, str] | None = None) -> bytes:
    """The image's OCI config as canonical JSON; ``platform``: (os, arch, variant), this
    machine's by default."""
    os_name, arch, variant = platform or host_platform()
    config = info.config.to_json()
    doc: dict[str, object] = {"architecture": arch, "os": os_name, "config": config,
                              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    if variant:
        doc["variant"] = variant
    if config.get("Author"):  # (MAINTAINER's: Docker's image has it at the top)
        doc["author"] = config.pop("Author")
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class OciImage:
    """A stored image as OCI blobs: what a push uploads and `image save` writes."""

    config: bytes  # the OCI image config (canonical JSON)
    config_digest: str
    layers: list[tuple[str, str, int]]  # (digest, "tar"|"gzip"|"zstd", size), base first
    manifest: bytes  # the OCI image manifest naming them

    @property
    def digest(self) -> str:
        return f"sha256:{hashlib.sha256(self.manifest).hexdigest()}"


def oci_image(store: ImageStore, info: ImageInfo,
              platform: tuple[str, str, str] | None = None) -> OciImage:
    """``info``'s image as OCI blobs (each layer read once, for its uncompressed digest)."""
    layers = [(d, layer_kind(store, d), store.blob_path(d).stat().st_size)
              for d in info.layers]
    config = oci_config(info, [diff_id(store, d) for d, _, _ in layers], platform)
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": MT_LAYER[kind], "digest": d, "size": size}
                   for d, kind, size in layers]}, separators=(",", ":")).encode()
    return OciImage(config, config_digest, layers, manifest)


def push(client: RegistryClient, store: ImageStore, source: str, target: str = "",
         on_blob: Callable[[str, str], None] | None = None) -> PushResult:
    """Push the image ``source`` names (a tag, id or id prefix) to ``target`` (a reference
    with a registry; default: ``source`` itself). ``on_blob(digest, status)`` is called as
    each blob is done. RegistryError and its kinds (auth, unreachable) as the client's;
    ImageNotFound when ``source`` is not here."""
    info = store.inspect(source)
    ref = target_reference(info, target or source)
    image = oci_image(store, info, client.platform())
    result = PushResult(ref=ref.familiar(), digest="", size=0)
    blobs: list[tuple[str, bytes | Path]] = [(d, store.blob_path(d))
                                             for d, _, _ in image.layers]
    for digest, blob in [*blobs, (image.config_digest, image.config)]:
        status = "pushed" if client.upload_blob(ref, digest, blob) else "exists"
        result.blobs.append((digest, status))
        if on_blob is not None:
            on_blob(digest, status)
    result.digest = client.put_manifest(ref, image.manifest, MT_OCI_MANIFEST)
    result.size = len(image.manifest)
    return result


__all__ = ["MT_LAYER", "MT_OCI_CONFIG", "OciImage", "PushResult", "diff_id", "layer_kind",
           "oci_config", "oci_image", "push", "target_reference"]
