"""A client for OCI-distribution (Docker Registry HTTP API v2) registries: pull, and the
blob and manifest uploads of a push (shoal.runtime.regpush).

Owns: talking to registries — resolving a tag to a manifest digest, reading manifests and
image indexes (this node's platform is picked), fetching config and layer blobs into the
image store (every byte verified against its digest, an interrupted blob download resumed
with an HTTP Range request), authentication (the Bearer token flow of the
``WWW-Authenticate`` challenge — realm, service, scope — and Basic auth), TLS with the
system CAs plus an optional CA file, and plain HTTP only for registries listed as insecure.
Must not touch: the image store's files (blobs go through ``ImageStore.import_blob`` and
images through ``ImageStore.add_image``, which write to tmp/ and rename, so an error leaves
nothing half-written), credentials at rest (the caller passes them in; this module never
logs or prints them), the network beyond the registry named by a reference (and the token
realm it names).

Why ``http.client`` run in a thread, not aiohttp: the image store is blocking (hashing,
disk, decompression) and is called from a thread anyway; a pull is a handful of sequential
requests whose body is streamed straight into ``import_blob``'s verifying copy, so a blocking
client fed to it needs no queue between an event loop and a thread, resuming a body is a
plain loop around ``read``, and the agent's event loop never sees a byte of a layer. The
agent runs each pull with ``asyncio.to_thread``.

Errors (declared in shoal.runtime.errors, all ``ImageError``\\ s)::

    RegistryError               a registry refused or failed a pull
    ├── RegistryUnreachable     cannot connect, TLS failure, timeout, 5xx after retries
    ├── RegistryAuthError       401/403: no or wrong credentials, token endpoint refused
    ├── ManifestUnknown         404 for the tag or digest (or the repository)
    └── UnsupportedImage        schema-1 manifest, unknown media type, no image for this
                                platform in the index, a manifest too large
    DigestMismatch              (shoal.runtime.errors) a manifest or blob is not what its
                                digest says: the registry or the path to it is lying
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import platform
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from shoal.runtime.errors import (
    DigestMismatch,
    ManifestUnknown,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    UnsupportedImage,
)
from shoal.runtime.images import ImageConfig, ImageInfo, ImageStore
from shoal.runtime.reference import DOCKER_HUB, Reference, parse_reference

log = logging.getLogger("shoal.registry")

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_V1 = ("application/vnd.docker.distribution.manifest.v1+json",
                "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFESTS = (MT_DOCKER_MANIFEST, MT_OCI_MANIFEST)
INDEXES = (MT_DOCKER_LIST, MT_OCI_INDEX)
ACCEPT = ", ".join((MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST))
LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
)
_HEX = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegistryConfig:
    """How this node talks to registries (``AgentConfig.registry``)."""

    # registries ("host:port" as in references) reached over plain HTTP; never the default:
    # anything on the path can then read credentials and swap content (digests still hold)
    insecure: tuple[str, ...] = ()
    # a PEM file of CA certificates trusted *in addition to* the system's; "" = system only
    ca_file: str = ""
    # seconds a connect or a single socket read may take before the request fails/resumes
    timeout: float = 30.0
    # times one blob download is resumed (Range request) after an interruption; 0 = never
    resume_attempts: int = 5
    # the platform picked from an index, "os/arch[/variant]"; "" = this machine's linux/ARCH
    platform: str = ""
    # a manifest or index larger than this is refused (bytes; they are normally < 100 KiB)
    max_manifest_bytes: int = 4 << 20

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ValueError("registry.timeout must be > 0")
        if self.resume_attempts < 0:
            raise ValueError("registry.resume_attempts must be >= 0")


def host_platform() -> tuple[str, str, str]:
    """("linux", GOARCH, variant) of this machine."""
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x"}.get(machine, machine)
    return "linux", arch, "v7" if machine == "armv7l" else ""


# --------------------------------------------------------------------- auth challenge
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|{_TOKEN})\s*(,|$)")
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """A ``WWW-Authenticate`` value as [(scheme lower-cased, {param lower-cased: value})].
    Quoted values may hold commas and backslash escapes; several challenges may share one
    header (``Basic realm="x", Bearer realm="y",service="z"``). Malformed trailing text is
    ignored (a registry's typo must not crash a pull; no challenge means no auth)."""
    out: list[tuple[str, dict[str, str]]] = []
    pos = 0
    while pos < len(header):
        while pos < len(header) and header[pos] in ", \t":
            pos += 1
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            p = _PARAM_RE.match(header, pos)
            if p is None:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append((scheme, params))
    return out


# ------------------------------------------------------------------------------ client
@dataclass
class Manifest:
    """One image manifest as the registry serves it, for this node's platform."""

    digest: str  # what the tag resolved to: the digest of the top-level manifest or index
    media_type: str
    config_digest: str
    layers: list[tuple[str, int]]  # (digest, size) bottom first
    platform_digest: str = ""  # the platform manifest's digest (= digest if no index)


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: http.client.HTTPResponse
    conn: http.client.HTTPConnection

    def read_all(self, limit: int) -> bytes:
        try:
            data = self.body.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryUnreachable(f"reading the registry's answer failed: {exc}") from exc
        finally:
            self.close()
        if len(data) > limit:
            raise UnsupportedImage(f"answer larger than {limit} bytes")
        return data

    def close(self) -> None:
        self.conn.close()


@dataclass
class PullProgress:
    """How far a pull is, for status messages (`service ps`, `image pull`). Written by the
    pulling thread, read by the event loop: plain counters, each write a single store."""

    ref: str
    phase: str = "resolving"  # resolving → pulling → extracting
    bytes_done: int = 0  # layer bytes in the store (from the registry, peers, or already here)
    bytes_total: int = 0  # the layers' sizes as the manifest says (0 until it is read)
    layers_done: int = 0
    layers_total: int = 0
    layers: frozenset[str] = frozenset()  # the layers' digests (empty until it is read)

    def message(self) -> str:
        """``pulling image: 12.3 of 45.6 MiB (3/5 layers)``."""
        if self.phase == "resolving":
            return f"pulling image {self.ref}: resolving"
        if self.phase == "extracting":
            return f"pulling image: extracting {self.layers_total} layers"
        mib = 1024 * 1024
        return (f"pulling image: {self.bytes_done / mib:.1f} of {self.bytes_total / mib:.1f} "
                f"MiB ({self.layers_done}/{self.layers_total} layers)")

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "phase": self.phase, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "layers_done": self.layers_done,
                "layers_total": self.layers_total, "message": self.message()}


@dataclass
class RegistryClient:
    """Pulls from registries. ``credentials(host)`` returns (username, password) or None;
    it is asked only when a registry challenges. Thread-safe for separate pulls (tokens are
    cached per registry and scope)."""

    config: RegistryConfig = field(default_factory=RegistryConfig)
    credentials: Callable[[str], tuple[str, str] | None] = lambda _host: None
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    _ssl: ssl.SSLContext | None = None
    #: bytes read from registries by this client (figures for benchmarks and tests)
    bytes_fetched: int = 0

    # ----------------------------------------------------------------- transport
    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if self.config.ca_file:
                try:
                    ctx.load_verify_locations(cafile=self.config.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    raise RegistryUnreachable(
                        f"cannot load the registry CA file {self.config.ca_file}: {exc}"
                    ) from exc
            self._ssl = ctx
        return self._ssl

    def _base(self, registry: str) -> str:
        if registry in self.config.insecure:
            return f"http://{registry}"
        host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        return f"https://{host}"

    def _open(self, method: str, url: str, headers: Mapping[str, str],
              body: bytes | Path | None = None) -> _Response:
        """One request; follows up to 5 redirects (dropping Authorization on another host).
        ``body``: bytes, or a file sent from its start (its Content-Length is set here)."""
        hdrs = dict(headers)
        if body is not None:
            hdrs["Content-Length"] = str(len(body) if isinstance(body, bytes)
                                         else body.stat().st_size)
        for _ in range(6):
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise RegistryUnreachable(f"bad registry URL {url!r}")
            conn: http.client.HTTPConnection
            if u.scheme == "https":
                conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=self.config.timeout,
                                                   context=self._ssl_context())
            else:
                conn = http.client.HTTPConnection(u.hostname, u.port,
                                                  timeout=self.config.timeout)
            path = u.path or "/"
            if u.query:
                path += f"?{u.query}"
            try:
                if isinstance(body, Path):
                    with body.open("rb") as fh:  # (streamed in blocks)
                        conn.request(method, path, body=fh, headers=hdrs)
                else:
                    conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                conn.close()
                raise RegistryUnreachable(f"TLS: {u.netloc}: {exc.verify_message}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                why = "timed out" if isinstance(exc, (TimeoutError, socket.timeout)) else exc
                raise RegistryUnreachable(f"cannot reach registry {u.netloc}: {why}") from exc
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                target = urllib.parse.urljoin(url, resp.getheader("Location") or "")
                conn.close()
                if urllib.parse.urlsplit(target).netloc != u.netloc:
                    hdrs.pop("Authorization", None)
                if urllib.parse.urlsplit(target).scheme == "http" and u.scheme == "https":
                    raise RegistryUnreachable(f"registry {u.netloc} redirects to plain HTTP")
                url = target
                continue
            return _Response(resp.status, resp.msg, resp, conn)
        raise RegistryUnreachable(f"too many redirects from {url}")

    # ---------------------------------------------------------------------- auth
    def _token(self, ref: Reference, params: Mapping[str, str], creds: tuple[str, str] | None,
               scoped: bool = True) -> str:
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryAuthError(f"registry {ref.registry} gave an unusable token realm")
        if realm.startswith("http://") and ref.registry not in self.config.insecure:
            raise RegistryAuthError(f"registry {ref.registry} sends credentials to a plain-HTTP "
                                    "token realm (list it as insecure to allow that)")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"} \
            if scoped else {}
        if creds is not None and not scoped:
            query["account"] = creds[0]
        if params.get("service"):
            query["service"] = params["service"]
        headers = {}
        if creds is not None:
            headers["Authorization"] = _basic(creds)
        sep = "&" if "?" in realm else "?"
        resp = self._open("GET", realm + sep + urllib.parse.urlencode(query), headers)
        body = resp.read_all(1 << 20)
        if resp.status in (401, 403):
            raise RegistryAuthError(f"registry {ref.registry}: the token service refused "
                                    + ("the credentials" if creds else
                                       "an anonymous pull (log in: shoal registry login)"))
        if resp.status != 200:
            raise RegistryUnreachable(f"registry {ref.registry}: the token service answered "
                                      f"{resp.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"registry {ref.registry}: the token service sent no token")
        return token

    def _request(self, ref: Reference, method: str, path: str,
                 headers: Mapping[str, str] | None = None, body: bytes | Path | None = None,
                 push: bool = False, url: str = "") -> _Response:
        """A request to the registry of ``ref`` (``path`` under its repository, or ``url``),
        answering its auth challenge once; ``push``: with the right to push there too."""
        url = url or f"{self._base(ref.registry)}/v2/{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        hdrs = dict(headers or {})
        token = self._tokens.get((ref.registry, scope))
        if token is not None:
            hdrs["Authorization"] = token
        resp = self._open(method, url, hdrs, body)
        if resp.status != 401:
            return resp
        challenge = resp.headers.get("WWW-Authenticate") or ""
        resp.close()
        challenges = dict(parse_challenges(challenge))
        creds = self.credentials(ref.registry)
        if "bearer" in challenges:  # (a push asks for both rights at once)
            params = {**challenges["bearer"], **({"scope": scope} if push else {})}
            auth = "Bearer " + self._token(ref, params, creds)
        elif "basic" in challenges:
            if creds is None:
                raise RegistryAuthError(f"registry {ref.registry} wants credentials "
                                        "(log in: shoal registry login)")
            auth = _basic(creds)
        else:
            raise RegistryAuthError(f"registry {ref.registry} wants an authentication scheme "
                                    f"shoal does not speak: {challenge[:80]!r}")
        hdrs["Authorization"] = auth
        resp = self._open(method, url, hdrs, body)
        if resp.status == 401:
            resp.close()
            if push and creds and "bearer" in challenges:  # (its token service took them)
                raise RegistryAuthError(f"registry {ref.registry} denies a push to "
                                        f"{ref.repository} with these credentials")
            raise RegistryAuthError(f"registry {ref.registry} refused the credentials"
                                    if creds else f"registry {ref.registry} wants credentials "
                                    "(log in: shoal registry login)")
        self._tokens[(ref.registry, scope)] = auth
        return resp

    def check_login(self, registry: str) -> None:
        """Whether this client's credentials open ``registry`` (``GET /v2/`` and its
        challenge, as ``docker login`` does). RegistryAuthError if refused."""
        creds = self.credentials(registry)
        url = f"{self._base(registry)}/v2/"
        resp = self._open("GET", url, {})
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate") or ""
            resp.close()
            challenges = dict(parse_challenges(challenge))
            if creds is None:
                raise RegistryAuthError(f"registry {registry} wants credentials")
            if "bearer" in challenges:
                probe = Reference(registry, "x")
                params = {k: v for k, v in challenges["bearer"].items() if k != "scope"}
                # (no scope: the token service only checks who we are, as docker login)
                auth = "Bearer " + self._token(probe, {**params, "scope": ""}, creds,
                                               scoped=False)
            else:
                auth = _basic(creds)
            resp = self._open("GET", url, {"Authorization": auth})
            if resp.status == 401:
                resp.close()
                raise RegistryAuthError(f"registry {registry} refused the credentials")
        status = resp.status
        resp.close()
        if status >= 300:
            raise RegistryError(f"registry {registry} answered {status} to /v2/")

    def _check(self, resp: _Response, ref: Reference, what: str) -> None:
        if resp.status < 300:
            return
        body = resp.read_all(64 << 10)
        code = ""
        try:
            errors = json.loads(body).get("errors") or []
            code = str(errors[0].get("code", "")) if errors else ""
        except (ValueError, AttributeError, IndexError, TypeError):
            pass
        if resp.status == 404:
            raise ManifestUnknown(f"{ref.familiar()}: {what} not found in registry "
                                  f"{ref.registry}" + (f" ({code})" if code else ""))
        if resp.status == 403:
            raise RegistryAuthError(f"registry {ref.registry} denies access to "
                                    f"{ref.repository}" + (f" ({code})" if code else ""))
        if resp.status >= 500 or resp.status == 429:
            raise RegistryUnreachable(f"registry {ref.registry} answered {resp.status} "
                                      f"for {what}")
        raise RegistryError(f"registry {ref.registry} answered {resp.status} for {what}"
                            + (f" ({code})" if code else ""))

    # ---------------------------------------------------------------------- push
    def upload_blob(self, ref: Reference, digest: str, blob: bytes | Path) -> bool:
        """Put ``blob`` (its bytes, or a file) in ``ref``'s repository as ``digest``, unless
        the registry has it already (False). One monolithic upload (POST, then PUT)."""
        head = self._request(ref, "HEAD", f"blobs/{digest}", push=True)
        head.close()
        if head.status == 200:
            return False
        resp = self._request(ref, "POST", "blobs/uploads/", body=b"", push=True)
        location = resp.headers.get("Location") or ""
        self._check(resp, ref, "a blob upload")
        resp.close()
        if not location:
            raise RegistryError(f"registry {ref.registry} started an upload without a Location")
        base = f"{self._base(ref.registry)}/v2/{ref.repository}/blobs/uploads/"
        target = urllib.parse.urljoin(base, location)
        there, here = urllib.parse.urlsplit(target), urllib.parse.urlsplit(base)
        if there.scheme != here.scheme and here.scheme == "https":
            raise RegistryUnreachable(f"registry {ref.registry} sends the upload to plain HTTP "
                                      f"({there.netloc}): refused (list it as insecure)")
        sep = "&" if "?" in target else "?"
        url = f"{target}{sep}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream"}
        if there.netloc == here.netloc:
            resp = self._request(ref, "PUT", "", headers, body=blob, push=True, url=url)
        else:  # (another host, e.g. storage behind the registry: no credentials of ours)
            resp = self._open("PUT", url, headers, blob)
        self._check(resp, ref, f"blob {digest}")
        resp.close()
        return True

    def put_manifest(self, ref: Reference, manifest: bytes, media_type: str) -> str:
        """Tag ``manifest`` as ``ref``'s tag; its digest (checked against the registry's)."""
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        resp = self._request(ref, "PUT", f"manifests/{ref.tag or 'latest'}",
                             {"Content-Type": media_type}, body=manifest, push=True)
        self._check(resp, ref, f"manifest {ref.tag or 'latest'}")
        announced = resp.headers.get("Docker-Content-Digest") or ""
        resp.close()
        if announced and announced != digest:
            raise DigestMismatch(f"{ref.familiar()}: the registry took manifest {digest} "
                                 f"as {announced}")
        return digest

    # ----------------------------------------------------------------- manifests
    def _get_manifest(self, ref: Reference, target: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of the manifest ``target`` (a tag or digest)."""
        resp = self._request(ref, "GET", f"manifests/{target}", {"Accept": ACCEPT})
        self._check(resp, ref, f"manifest {target}")
        media = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        announced = resp.headers.get("Docker-Content-Digest") or ""
        raw = resp.read_all(self.config.max_manifest_bytes)
        self.bytes_fetched += len(raw)
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatch(f"{ref.familiar_name}: manifest {target} served with "
                                 f"content {digest}")
        if announced and _HEX.fullmatch(announced) and announced != digest:
            raise DigestMismatch(f"{ref.familiar_name}: manifest announced as {announced} "
                                 f"is {digest}")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedImage(f"{ref.familiar()}: the manifest is not JSON") from exc
        if not isinstance(doc, dict):
            raise UnsupportedImage(f"{ref.familiar()}: the manifest is not a JSON object")
        media = str(doc.get("mediaType") or media)
        if media in MT_DOCKER_V1 or doc.get("schemaVersion") == 1:
            raise UnsupportedImage(f"{ref.familiar()}: Docker schema-1 manifests are not "
                                   "supported (push the image again with a current client)")
        if not media:  # OCI allows omitting mediaType: tell by shape
            media = MT_OCI_INDEX if "manifests" in doc else MT_OCI_MANIFEST
        return raw, media, digest

    def resolve(self, ref: Reference | str) -> str:
        """The digest ``ref``'s tag points to now (its top-level manifest or index): what the
        manager pins a service to."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        if r.digest:
            return r.digest
        resp = self._request(r, "HEAD", f"manifests/{r.tag}", {"Accept": ACCEPT})
        announced = resp.headers.get("Docker-Content-Digest") or ""
        if resp.status == 200 and _HEX.fullmatch(announced):
            resp.close()
            return announced
        if resp.status >= 300:
            status = resp.status
            resp.close()
            if status == 404:
                raise ManifestUnknown(f"{r.familiar()}: manifest {r.tag} not found in "
                                      f"registry {r.registry}")
        else:
            resp.close()
        return self._get_manifest(r, r.tag)[2]  # (no usable HEAD: hash the manifest itself)

    def manifest(self, ref: Reference | str) -> Manifest:
        """The manifest of ``ref`` for this node's platform (following an index)."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        raw, media, digest = self._get_manifest(r, r.digest or r.tag)
        top = digest
        for _ in range(3):
            doc = json.loads(raw)
            if media in INDEXES:
                chosen = self._pick(r, doc)
                raw, media, digest = self._get_manifest(r, chosen)
                continue
            if media not in MANIFESTS:
                raise UnsupportedImage(f"{r.familiar()}: unknown manifest type {media!r}")
            try:
                config = str(doc["config"]["digest"])
                layers = [(str(x["digest"]), int(x.get("size", 0))) for x in doc["layers"]]
                kinds = [str(x.get("mediaType", "")) for x in doc["layers"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise UnsupportedImage(f"{r.familiar()}: malformed manifest: {exc}") from exc
            for (d, _size), kind in zip(layers, kinds, strict=True):
                if not _HEX.fullmatch(d):
                    raise UnsupportedImage(f"{r.familiar()}: layer digest {d!r} is not sha256")
                if kind and kind not in LAYER_TYPES:
                    raise UnsupportedImage(f"{r.familiar()}: layer type {kind!r} is not "
                                           "supported")
            if not _HEX.fullmatch(config):
                raise UnsupportedImage(f"{r.familiar()}: config digest {config!r} is not "
                                       "sha256")
            return Manifest(top, media, config, layers, digest)
        raise UnsupportedImage(f"{r.familiar()}: image indexes nested too deep")

    def platform(self) -> tuple[str, str, str]:
        """(os, arch, variant) this client pulls and pushes: ``config.platform``, else this
        machine's."""
        want_os, want_arch, want_variant = host_platform()
        if self.config.platform:
            parts = self.config.platform.split("/")
            want_os, want_arch = parts[0], parts[1] if len(parts) > 1 else want_arch
            want_variant = parts[2] if len(parts) > 2 else ""
        return want_os, want_arch, want_variant

    def _pick(self, ref: Reference, index: dict[str, Any]) -> str:
        want_os, want_arch, want_variant = self.platform()
        offered = []
        fallback = ""
        for m in index.get("manifests") or []:
            if not isinstance(m, dict):
                continue
            p = m.get("platform") or {}
            offered.append(f"{p.get('os')}/{p.get('architecture')}")
            if p.get("os") == want_os and p.get("architecture") == want_arch:
                digest = str(m.get("digest", ""))
                if not want_variant or p.get("variant") in (None, "", want_variant):
                    return digest
                fallback = fallback or digest
        if fallback:
            return fallback
        raise UnsupportedImage(f"{ref.familiar()}: no image for {want_os}/{want_arch} in the "
                               f"index (it has: {', '.join(offered) or 'none'})")

    # --------------------------------------------------------------------- blobs
    def fetch_blob(self, ref: Reference, digest: str, store: ImageStore, size: int = -1,
                   progress: PullProgress | None = None) -> int:
        """Download blob ``digest`` of ``ref``'s repository into ``store`` (verified); an
        interrupted download is resumed where it stopped (Range), up to
        ``config.resume_attempts`` times. Return the bytes read from the registry.
        ``progress.bytes_done`` grows with every chunk handed to the store."""
        if store.has_blob(digest):
            return 0
        body = _ResumingBody(self, ref, digest, progress)
        try:
            store.import_blob(digest, cast(IO[bytes], body))  # (it only calls read)
        finally:
            body.close()
            self.bytes_fetched += body.received
        if size >= 0 and body.offset != size:
            log.warning("blob %s of %s: %d bytes, manifest said %d", digest[:19],
                        ref.familiar_name, body.offset, size)
        return body.received

    def config_blob(self, ref: Reference, digest: str) -> dict[str, Any]:
        resp = self._request(ref, "GET", f"blobs/{digest}")
        self._check(resp, ref, f"config blob {digest[:19]}")
        raw = resp.read_all(self.config.max_manifest_bytes)
        self.bytes_fetched += len(raw)
        if f"sha256:{hashlib.sha256(raw).hexdigest()}" != digest:
            raise DigestMismatch(f"{ref.familiar_name}: config blob {digest} does not match "
                                 "its digest")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedImage(f"{ref.familiar()}: the image config is not JSON") from exc
        if not isinstance(doc, dict):
            raise UnsupportedImage(f"{ref.familiar()}: the image config is not an object")
        return doc

    # ---------------------------------------------------------------------- pull
    def pull(self, ref: Reference | str, store: ImageStore,
             fetch_elsewhere: Callable[[str], bool] | None = None,
             progress: PullProgress | None = None) -> ImageInfo:
        """Pull ``ref`` into ``store`` and tag it (``name:tag`` and ``name@digest``).

        ``fetch_elsewhere(digest)`` is asked first for every layer the store lacks (the peer
        transfer: True if it put the blob into the store); the registry serves the rest.
        ``progress`` (if given) is kept up to date as layers arrive."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        started = time.monotonic()
        p = progress or PullProgress(r.familiar())
        man = self.manifest(r)
        pinned = r.with_digest(man.digest)
        config = self.config_blob(r, man.config_digest)
        p.bytes_total = sum(max(size, 0) for _, size in man.layers)
        p.layers_total = len(man.layers)
        p.layers = frozenset(digest for digest, _ in man.layers)
        p.phase = "pulling"
        for digest, size in man.layers:
            before = p.bytes_done
            if not store.has_blob(digest) and not (
                    fetch_elsewhere is not None and fetch_elsewhere(digest)
                    and store.has_blob(digest)):
                self.fetch_blob(r, digest, store, size, p)
            p.bytes_done = before + max(size, 0)
            p.layers_done += 1
        p.phase = "extracting"
        info = store.add_image(man.layers, image_config(config), pinned.store_tags)
        log.info("pulled %s (%s) in %.2fs", pinned.familiar(), info.id[:19],
                 time.monotonic() - started)
        return info


def image_config(config_doc: Mapping[str, Any]) -> ImageConfig:
    """The runtime's ImageConfig from an OCI/Docker image config document (its top-level
    ``author``, MAINTAINER's, as the config's ``Author``)."""
    config = config_doc.get("config")
    author = config_doc.get("author")
    if isinstance(config, dict) and isinstance(author, str) and author:
        config = {**config, "Author": config.get("Author") or author}
    return ImageConfig.from_json(config)


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


class _ResumingBody:
    """A blob's bytes as a readable stream; on a broken connection it asks again for the
    rest (``Range: bytes=OFFSET-``). A server that ignores Range (200) is skipped forward."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str,
                 progress: PullProgress | None = None) -> None:
        self.client, self.ref, self.digest = client, ref, digest
        self.progress = progress
        self.offset = 0  # bytes handed to the reader
        self.received = 0  # bytes read from the network (skipped ones included)
        self.resumes = 0
        self.total = -1  # the blob's length when the registry says it (-1: unknown)
        self._resp: _Response | None = None

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.client._request(self.ref, "GET", f"blobs/{self.digest}", headers)
        if self.offset and resp.status == 206:
            rng = resp.headers.get("Content-Range") or ""
            m = re.match(r"bytes (\d+)-\d+/(\d+)", rng)
            if m is None or int(m.group(1)) != self.offset:
                resp.close()
                raise RegistryUnreachable(f"registry {self.ref.registry} resumed blob "
                                          f"{self.digest[:19]} at the wrong offset ({rng})")
            self.total = int(m.group(2))
        elif resp.status == 200 and self.offset:
            skip = self.offset
            while skip:
                chunk = resp.body.read(min(skip, _CHUNK))
                if not chunk:
                    resp.close()
                    raise RegistryUnreachable("blob ended early while skipping to the offset")
                self.received += len(chunk)
                skip -= len(chunk)
        else:
            self.client._check(resp, self.ref, f"blob {self.digest[:19]}")
        length = resp.headers.get("Content-Length")
        if resp.status == 200 and length and length.isdigit():
            self.total = int(length)
        self._resp = resp

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else n
        while True:
            try:
                if self._resp is None:
                    self._connect()
                assert self._resp is not None
                data = self._resp.body.read(n)
                if not data and 0 <= self.offset < self.total:  # cut short, no error raised
                    raise http.client.IncompleteRead(b"", self.total - self.offset)
            except (OSError, http.client.HTTPException, RegistryUnreachable) as exc:
                self.close()
                if self.resumes >= self.client.config.resume_attempts:
                    raise RegistryUnreachable(
                        f"blob {self.digest[:19]} from {self.ref.registry}: {exc} "
                        f"(after {self.resumes} resumes)") from exc
                self.resumes += 1
                log.info("blob %s: resuming at byte %d after: %s", self.digest[:19],
                         self.offset, exc)
                time.sleep(min(0.2 * self.resumes, 2.0))
                continue
            self.offset += len(data)
            self.received += len(data)
            if self.progress is not None:
                self.progress.bytes_done += len(data)
            if not data:
                self.close()
            return data

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None


__all__ = ["ACCEPT", "Manifest", "ManifestUnknown", "PullProgress", "RegistryAuthError",
           "RegistryClient",
           "RegistryConfig", "RegistryError", "RegistryUnreachable", "UnsupportedImage",
           "host_platform", "image_config", "parse_challenges"]
