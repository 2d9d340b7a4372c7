"""Test helpers for a real registry: Debian's ``docker-registry`` (CNCF distribution 2.8),
a test CA, htpasswd Basic auth, a small Docker-token issuer, and images built from
busybox-static and pushed with Debian's ``skopeo``.

Owns: the files under the directory a test gives it, and the processes/threads it starts
(the registry by pid, the token server thread); ``close()`` stops them. Must not touch:
anything else; traffic only to the address the test chooses (loopback or a lab host).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REGISTRY_BIN = "/usr/bin/docker-registry"
SKOPEO = "/usr/bin/skopeo"
HTPASSWD = "/usr/bin/htpasswd"
BUSYBOX = "/bin/busybox"


# ---------------------------------------------------------------------------- test CA
def make_ca(dest: Path, ips: Sequence[str]) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem): a CA and a server certificate for ``ips``."""
    dest.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registry")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = dest / "ca.pem", dest / "cert.pem", dest / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


# ------------------------------------------------------------------------ token issuer
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """The Docker token flow's authorization server: ``GET /token?service=&scope=`` with Basic
    credentials answers ``{"token": JWT}`` (ES256, ``x5c`` = its own self-signed certificate,
    which the registry trusts as ``rootcertbundle``). Runs over HTTPS in a thread."""

    def __init__(self, dest: Path, host: str, users: dict[str, str], service: str,
                 tls_cert: Path, tls_key: Path) -> None:
        self.users, self.service = users, service
        self.issuer = "shoal-test-issuer"
        self.requests: list[tuple[str, str]] = []  # (user or "", scope)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .sign(self.key, hashes.SHA256()))
        self.bundle = dest / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlsplit
                q = parse_qs(urlsplit(self.path).query)
                user = ""
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if issuer.users.get(u) != p:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = q.get("scope", [])
                issuer.requests.append((user, " ".join(scopes)))
                access = []
                for scope in scopes:
                    kind, name, actions = scope.split(":", 2)
                    # anonymous: nothing; a known user: what it asked for
                    access.append({"type": kind, "name": name,
                                   "actions": actions.split(",") if user else []})
                body = json.dumps({"token": issuer.token(user, access),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.realm = f"https://{host}:{self.port}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, user: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"alg": "ES256", "typ": "JWT", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300,
                  "nbf": now - 60, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing.encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return f"{signing}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------- registry
class Registry:
    """A running docker-registry with TLS (test CA) and Basic or token auth.

    ``spawn`` (optional) starts the process elsewhere (a lab host's ``spawn``); by default it
    runs here, on the address given. Its access log (the registry's stdout/stderr) is
    ``self.log``."""

    def __init__(self, dest: Path, host: str, port: int, *, users: dict[str, str],
                 auth: str = "basic", extra_ips: Sequence[str] = (),
                 spawn: Any = None, netns: str = "") -> None:
        self.dest, self.host, self.port = dest, host, port
        self.addr = f"{host}:{port}"
        self.users = users
        self.netns = netns  # pushes run in this network namespace (the registry's lab host)
        dest.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = make_ca(dest / "tls", [host, "127.0.0.1", *extra_ips])
        self.token: TokenIssuer | None = None
        auth_cfg: dict[str, Any] = {}
        if auth == "none":
            pass
        elif auth == "basic":
            htpasswd = dest / "htpasswd"
            htpasswd.write_text("")
            for user, pw in users.items():
                subprocess.run([HTPASSWD, "-Bb", str(htpasswd), user, pw], check=True,
                               capture_output=True)
            auth_cfg = {"htpasswd": {"realm": "shoal-test", "path": str(htpasswd)}}
        else:
            self.token = TokenIssuer(dest, host, users, "shoal-registry", self.cert, self.key)
            auth_cfg = {"token": {"realm": self.token.realm, "service": "shoal-registry",
                                  "issuer": self.token.issuer,
                                  "rootcertbundle": str(self.token.bundle)}}
        cfg = {"version": 0.1,
               "log": {"level": "info", "accesslog": {"disabled": False}},
               "storage": {"filesystem": {"rootdirectory": str(dest / "data")},
                           "delete": {"enabled": True}},
               "http": {"addr": self.addr, "tls": {"certificate": str(self.cert),
                                                   "key": str(self.key)}},
               **({"auth": auth_cfg} if auth_cfg else {})}
        self.config = dest / "config.yml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.log = dest / "registry.log"
        self.proc: subprocess.Popen[bytes]
        if spawn is not None:
            self.proc = spawn(REGISTRY_BIN, "serve", str(self.config), log_name="registry")
            self.log = Path(spawn.__self__.data_dir) / "registry.log"
        else:
            with open(self.log, "ab") as fh:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)],
                                             stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                             start_new_session=True)

    def wait_ready(self, probe: Any = None, timeout: float = 20.0) -> None:
        """Wait until the registry accepts connections (in a lab host: until it logs that it
        listens)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if probe is not None or self.netns:
                if "listening on" in self.log.read_text(errors="replace"):
                    return
            else:
                with contextlib.suppress(OSError):
                    socket.create_connection((self.host, self.port), timeout=0.5).close()
                    return
            time.sleep(0.1)
        raise RuntimeError(f"registry not ready: {self.log.read_text()[-2000:]}")

    def push(self, layout: Path, tag: str, ref: str, *, fmt: str = "", all_: bool = False
             ) -> None:
        """skopeo copy oci:LAYOUT:TAG docker://ADDR/REF."""
        argv = ["nsenter", f"--net=/var/run/netns/{self.netns}", "--"] if self.netns else []
        argv += [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
        if self.users:
            user, pw = next(iter(self.users.items()))
            argv += ["--dest-creds", f"{user}:{pw}"]
        if fmt:
            argv += ["--format", fmt]
        if all_:
            argv += ["--all"]
        argv += [f"oci:{layout}:{tag}", f"docker://{self.addr}/{ref}"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HOME": str(self.dest)})
        if res.returncode != 0:
            raise RuntimeError(f"skopeo push failed: {res.stderr}")

    def blob_path(self, digest: str) -> Path:
        hexpart = digest.removeprefix("sha256:")
        return (self.dest / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hexpart[:2] / hexpart / "data")

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob ``digest`` the access log shows (answered 200 or 206)."""
        text = self.log.read_text(errors="replace")
        n = 0
        for line in text.splitlines():
            if '"GET /v2/' in line and f"/blobs/{digest} " in line and (
                    '" 200 ' in line or '" 206 ' in line):
                n += 1
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.token is not None:
            self.token.close()


# ------------------------------------------------------------------------- test images
def _tar(entries: Sequence[tuple[str, bytes | None, int, str]]) -> bytes:
    """A layer tar of (path, content or None for a dir, mode, symlink target or "")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content, mode, link in entries:
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, 1_700_000_000
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest, len(data)


def build_layout(layout: Path, tag: str, *, marker: str, extra_mib: int = 0,
                 zstd_layer: bool = False, arches: Sequence[str] = (),
                 extra_layers: int = 1) -> dict[str, Any]:
    """An OCI image layout at ``layout`` with image ``tag``: a busybox-static layer (gzip), a
    layer with /etc/marker = ``marker`` (zstd if asked, else gzip) and optionally
    ``extra_mib`` MiB of incompressible data in each of ``extra_layers`` more layers. With
    ``arches`` the tag names an index of one image per architecture (each with its own
    marker). Returns {"manifest": digest of what the tag names}."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    busybox = Path(BUSYBOX).read_bytes()
    base = gzip.compress(_tar([("bin", None, 0o755, ""), ("bin/busybox", busybox, 0o755, ""),
                               ("bin/sh", None, 0o777, "busybox"),
                               ("etc", None, 0o755, "")]), mtime=0)

    def one(arch: str, mark: str) -> tuple[str, int]:
        layers = [(_blob(layout, base), "application/vnd.oci.image.layer.v1.tar+gzip")]
        second = _tar([("etc/marker", f"{mark}\n".encode(), 0o644, "")])
        if zstd_layer:
            z = subprocess.run(["zstd", "-q", "-c"], input=second, capture_output=True,
                               check=True).stdout
            layers.append((_blob(layout, z), "application/vnd.oci.image.layer.v1.tar+zstd"))
        else:
            layers.append((_blob(layout, gzip.compress(second, mtime=0)),
                           "application/vnd.oci.image.layer.v1.tar+gzip"))
        for i in range(extra_layers if extra_mib else 0):
            rnd = os.urandom(extra_mib << 20)
            third = _tar([("data", None, 0o755, ""), (f"data/blob{i}", rnd, 0o644, "")])
            layers.append((_blob(layout, gzip.compress(third, compresslevel=1, mtime=0)),
                           "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids = []
        for (d, _), kind in layers:
            raw = (layout / "blobs" / "sha256" / d[7:]).read_bytes()
            plain = gzip.decompress(raw) if kind.endswith("gzip") else subprocess.run(
                ["zstd", "-dq", "-c"], input=raw, capture_output=True, check=True).stdout
            diff_ids.append(f"sha256:{hashlib.sha256(plain).hexdigest()}")
        config = {"architecture": arch, "os": "linux",
                  "config": {"Entrypoint": ["/bin/sh", "-c"],
                             "Cmd": ["echo started $(cat /etc/marker); exec sleep 1000"],
                             "Env": ["PATH=/bin", f"MARKER={mark}"], "WorkingDir": "/etc",
                             "StopSignal": "SIGINT", "ExposedPorts": {"8080/tcp": {}}},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        cfg = _blob(layout, json.dumps(config).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cfg[0], "size": cfg[1]},
                    "layers": [{"mediaType": kind, "digest": d, "size": s}
                               for (d, s), kind in layers]}
        return _blob(layout, json.dumps(manifest).encode())

    from shoal.runtime.registry import host_platform
    here = host_platform()[1]
    if arches:
        entries = []
        for arch in arches:
            d, s = one(arch, f"{marker}-{arch}")
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": d, "size": s,
                            "platform": {"os": "linux", "architecture": arch}})
        top = _blob(layout, json.dumps({"schemaVersion": 2,
                                        "mediaType": "application/vnd.oci.image.index.v1+json",
                                        "manifests": entries}).encode())
        top_type = "application/vnd.oci.image.index.v1+json"
    else:
        top = one(here, marker)
        top_type = "application/vnd.oci.image.manifest.v1+json"
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                          != tag]
    index["manifests"].append({"mediaType": top_type, "digest": top[0], "size": top[1],
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return {"manifest": top[0]}


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
