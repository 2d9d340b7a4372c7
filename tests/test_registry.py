"""The registry client against a real registry (Debian's docker-registry, the CNCF
distribution server) on loopback: TLS from a test CA, htpasswd Basic auth, and a second
registry with Docker token auth served by a token issuer in the test. Images are built
here from busybox-static and pushed with Debian's skopeo.

Each error case also checks that nothing half-written is left in the image store."""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import registryd
from helpers import free_port

from shoal.runtime.errors import DigestMismatch
from shoal.runtime.images import ImageGCConfig, ImageStore
from shoal.runtime.registry import (
    ManifestUnknown,
    PullProgress,
    RegistryAuthError,
    RegistryClient,
    RegistryConfig,
    RegistryError,
    RegistryUnreachable,
)

USERS = {"alice": "s3cret"}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.basic = registryd.Registry(tmp / "basic", "127.0.0.1", free_port(),
                                        users=USERS)
        self.token = registryd.Registry(tmp / "token", "127.0.0.1", free_port(),
                                        users=USERS, auth="token")
        self.layout = tmp / "layout"
        self.built = registryd.build_layout(self.layout, "1", marker="one", zstd_layer=True)
        registryd.build_layout(self.layout, "2", marker="two")
        registryd.build_layout(self.layout, "multi", marker="m", arches=["arm64", "amd64",
                                                                         "ppc64le"])
        for reg in (self.basic, self.token):
            reg.wait_ready()
            reg.push(self.layout, "1", "team/app:1")
            reg.push(self.layout, "multi", "team/app:multi", all_=True)
        self.basic.push(self.layout, "2", "team/app:v2s2", fmt="v2s2")

    def client(self, reg: registryd.Registry, creds: tuple[str, str] | None = ("alice",
                                                                               "s3cret"),
               **cfg: Any) -> RegistryClient:
        return RegistryClient(RegistryConfig(ca_file=str(reg.ca), **cfg),
                              credentials=lambda _h: creds)

    def close(self) -> None:
        self.basic.close()
        self.token.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("registry"))
    try:
        yield e
    finally:
        e.close()


def store_files(store: ImageStore) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*")
            if p.is_file() and p.name != "repositories.json"}


def test_pull_by_tag_with_basic_auth_verifies_and_honours_the_config(env: Env,
                                                                    tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    c = env.client(env.basic)
    ref = f"{env.basic.addr}/team/app:1"
    digest = c.resolve(ref)
    assert digest == env.built["manifest"]  # what skopeo pushed, byte for byte
    info = c.pull(ref, store)
    assert set(info.tags) == {ref, f"{env.basic.addr}/team/app@{digest}"}
    # found again by tag, by digest, and by the pinned form a manager writes into a spec
    assert store.inspect(f"{ref}@{digest}").id == info.id
    cfg = info.config
    assert cfg.entrypoint == ("/bin/sh", "-c") and cfg.workdir == "/etc"
    assert cfg.env["MARKER"] == "one" and cfg.stop_signal == "SIGINT"
    assert cfg.exposed_ports == ((8080, "tcp"),)
    top = store.layer_dirs(info)[0]  # the zstd layer, unpacked
    assert (top / "etc" / "marker").read_text() == "one\n"
    assert not list((store.root / "tmp").iterdir())


def test_token_flow_pulls_with_credentials_and_refuses_wrong_ones(env: Env,
                                                                   tmp_path: Path) -> None:
    assert env.token.token is not None
    ref = f"{env.token.addr}/team/app:1"
    store = ImageStore(tmp_path / "images")
    before = len(env.token.token.requests)
    info = env.client(env.token).pull(ref, store)
    asked = env.token.token.requests[before:]
    assert asked and all(user == "alice" and scope == "repository:team/app:pull"
                         for user, scope in asked)
    assert info.config.env["MARKER"] == "one"
    empty = ImageStore(tmp_path / "other")
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        env.client(env.token, creds=("alice", "wrong")).pull(ref, empty)
    with pytest.raises(RegistryAuthError):  # anonymous: a token without access
        env.client(env.token, creds=None).pull(ref, empty)
    assert store_files(empty) == set()


def test_basic_auth_errors_are_clear(env: Env, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    ref = f"{env.basic.addr}/team/app:1"
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        env.client(env.basic, creds=("alice", "nope")).pull(ref, store)
    with pytest.raises(RegistryAuthError, match="shoal registry login"):
        env.client(env.basic, creds=None).pull(ref, store)
    assert store_files(store) == set()


def test_index_picks_this_platform_and_docker_schema2_works(env: Env, tmp_path: Path) -> None:
    from shoal.runtime.registry import host_platform
    store = ImageStore(tmp_path / "images")
    c = env.client(env.basic)
    info = c.pull(f"{env.basic.addr}/team/app:multi", store)
    assert info.config.env["MARKER"] == f"m-{host_platform()[1]}"
    man = c.manifest(f"{env.basic.addr}/team/app:v2s2")
    assert man.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert c.pull(f"{env.basic.addr}/team/app:v2s2", store).config.env["MARKER"] == "two"


def test_unknown_tag_unreachable_registry_and_untrusted_tls(env: Env, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ManifestUnknown, match="not found"):
        env.client(env.basic).pull(f"{env.basic.addr}/team/app:nope", store)
    with pytest.raises(ManifestUnknown):
        env.client(env.basic).pull(f"{env.basic.addr}/team/other:1", store)
    closed = free_port()
    with pytest.raises(RegistryUnreachable, match="cannot reach"):
        env.client(env.basic).pull(f"127.0.0.1:{closed}/team/app:1", store)
    with pytest.raises(RegistryUnreachable, match="TLS"):
        RegistryClient(credentials=lambda _h: ("alice", "s3cret")).pull(
            f"{env.basic.addr}/team/app:1", store)
    with pytest.raises(RegistryError, match="400"):  # plain HTTP to a TLS port: no hang
        env.client(env.basic, insecure=(env.basic.addr,)).pull(
            f"{env.basic.addr}/team/app:1", store)
    assert store_files(store) == set()


def test_a_tampered_blob_is_refused_and_nothing_is_kept(env: Env, tmp_path: Path) -> None:
    reg = registryd.Registry(tmp_path / "reg", "127.0.0.1", free_port(),
                             users=USERS)
    try:
        reg.wait_ready()
        reg.push(env.layout, "2", "team/app:2")
        c = env.client(reg)
        man = c.manifest(f"{reg.addr}/team/app:2")
        victim = reg.blob_path(man.layers[-1][0])
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        store = ImageStore(tmp_path / "images")
        with pytest.raises(DigestMismatch):
            c.pull(f"{reg.addr}/team/app:2", store)
        # the good blobs may stay (they are verified and content-addressed), but no image,
        # no tag, no bad blob, nothing in tmp/
        assert store.ls() == []
        assert not store.has_blob(man.layers[-1][0])
        assert not list((store.root / "tmp").iterdir())
    finally:
        reg.close()


class _CuttingProxy:
    """A plain-HTTP front of the TLS registry (an "insecure" registry for the client) that
    cuts the first blob download after half of its body."""

    def __init__(self, target: registryd.Registry) -> None:
        import ssl
        ctx = ssl.create_default_context(cafile=str(target.ca))
        self.cut_done = False
        self.ranges: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: Any) -> None:
                pass

            def _forward(self) -> None:
                conn = http.client.HTTPSConnection(target.host, target.port, context=ctx,
                                                   timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                if "Range" in headers:
                    proxy.ranges.append(headers["Range"])
                conn.request(self.command, self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                cut = ("/blobs/" in self.path and len(body) > 100_000
                       and not proxy.cut_done and self.command == "GET")
                if cut:
                    proxy.cut_done = True
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(body)
                self.close_connection = True
                conn.close()

            do_GET = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_interrupted_blob_is_resumed_with_a_range_request(env: Env, tmp_path: Path) -> None:
    proxy = _CuttingProxy(env.basic)
    try:
        store = ImageStore(tmp_path / "images")
        c = env.client(env.basic, insecure=(proxy.addr,))
        info = c.pull(f"{proxy.addr}/team/app:1", store)
        assert proxy.cut_done
        assert proxy.ranges and all(r.startswith("bytes=") and r != "bytes=0-"
                                    for r in proxy.ranges)
        assert (store.layer_dirs(info)[-1] / "bin" / "busybox").exists()
        # with resumes turned off the same cut is an error, and nothing is left behind
        proxy.cut_done = False
        other = ImageStore(tmp_path / "other")
        with pytest.raises(RegistryUnreachable, match="resumes"):
            env.client(env.basic, insecure=(proxy.addr,), resume_attempts=0).pull(
                f"{proxy.addr}/team/app:1", other)
        assert other.ls() == [] and not list((other.root / "tmp").iterdir())
    finally:
        proxy.close()


def test_pull_asks_elsewhere_first_and_the_registry_only_for_the_rest(env: Env,
                                                                     tmp_path: Path) -> None:
    """The peer hook: a layer another store already has is not fetched from the registry."""
    first = ImageStore(tmp_path / "first")
    c = env.client(env.basic)
    ref = f"{env.basic.addr}/team/app:1"
    c.pull(ref, first)
    second = ImageStore(tmp_path / "second")
    asked: list[str] = []

    def from_peer(digest: str) -> bool:
        asked.append(digest)
        if digest == c.manifest(ref).layers[0][0]:  # the "peer" has only the base layer
            with first.export_blob(digest) as fh:
                second.import_blob(digest, fh)
            return True
        return False

    c2 = env.client(env.basic)
    info = c2.pull(ref, second, fetch_elsewhere=from_peer)
    man = c.manifest(ref)
    assert asked == [d for d, _ in man.layers]
    assert c2.bytes_fetched < man.layers[0][1]  # the big base layer did not come from it
    assert info.id == first.inspect(ref).id  # same bytes, same image id on every node
    shutil.rmtree(tmp_path / "first")


def test_the_manager_pins_tags_per_resolve_mode(env: Env, tmp_path: Path) -> None:
    """``--resolve-image``: always pins (again), changed pins only an unpinned image, never
    leaves it; an unreachable registry leaves the tag with a warning; bare names are never
    sent to a registry."""
    import asyncio
    from types import SimpleNamespace

    from shoal.node.registries import Registries
    from shoal.raft.validate import validate_spec

    reg = registryd.Registry(tmp_path / "open", "127.0.0.1", free_port(), users={},
                             auth="none")
    try:
        reg.wait_ready()
        reg.push(env.layout, "1", "team/app:1")
        reg.push(env.layout, "2", "team/app:2")
        one = env.client(reg).resolve(f"{reg.addr}/team/app:1")
        two = env.client(reg).resolve(f"{reg.addr}/team/app:2")
        ctx = SimpleNamespace(store=None, identity=None)
        # (only what resolve_spec uses: no stored credentials here, so anonymous)
        regs = Registries(ctx, None, None, RegistryConfig(ca_file=str(reg.ca)),  # type: ignore
                          ImageStore(tmp_path / "img"), None)  # type: ignore

        def spec(image: str) -> Any:
            return validate_spec({"name": "s", "task": {"container": {"image": image}}})

        def resolve(image: str, mode: str | None, previous: Any = None) -> tuple[str, list[str]]:
            out, warnings = asyncio.run(regs.resolve_spec(spec(image), mode, previous))
            return out.task.container.image, warnings

        tag = f"{reg.addr}/team/app:1"
        assert resolve(tag, None) == (f"{tag}@{one}", [])  # create: always
        assert resolve(tag, "never") == (tag, [])
        assert resolve(f"{tag}@{two}", "changed", spec(tag)) == (f"{tag}@{two}", [])
        assert resolve(f"{tag}@{two}", "always") == (f"{tag}@{one}", [])  # the tag, again
        assert resolve(f"{reg.addr}/team/app@{two}", "always") == (
            f"{reg.addr}/team/app@{two}", [])  # pinned by the user without a tag: kept
        assert resolve("app:1", "always") == ("app:1", [])  # a local image name
        gone = f"127.0.0.1:{free_port()}/team/app:1"
        image, warnings = resolve(gone, "always")
        assert image == gone and "could not be resolved" in warnings[0]
        with pytest.raises(Exception, match="resolve_image"):
            resolve(tag, "sometimes")
    finally:
        reg.close()


def test_pull_progress_counts_every_layer_byte(env: Env, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    ref = f"{env.basic.addr}/team/app:1"
    seen: list[int] = []
    progress = PullProgress(ref)

    def elsewhere(_digest: str) -> bool:  # (called between layers: a sample of progress)
        seen.append(progress.bytes_done)
        return False

    info = env.client(env.basic).pull(ref, store, elsewhere, progress)
    assert progress.layers_done == progress.layers_total == len(info.layers)
    assert progress.bytes_done == progress.bytes_total == info.size > 0
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] < info.size
    assert progress.message() == f"pulling image: extracting {len(info.layers)} layers"
    progress.phase = "pulling"
    assert progress.message().startswith("pulling image: ") and f"({len(info.layers)}/" \
        in progress.message()


def test_prune_and_gc_keep_used_images_and_remove_the_rest_safely(env: Env,
                                                                   tmp_path: Path) -> None:
    used: set[str] = set()
    store = ImageStore(tmp_path / "images", in_use=lambda: set(used))
    c = env.client(env.basic)
    one = c.pull(f"{env.basic.addr}/team/app:1", store)
    two = c.pull(f"{env.basic.addr}/team/app:v2s2", store)
    assert set(one.layers) & set(two.layers)  # (the busybox base layer is shared)
    used.add(one.id)
    # prune without -a: both have a name:tag, nothing is dangling
    assert store.prune()["deleted"] == []
    # -a with until: both were pulled just now
    assert store.prune(all=True, until=3600)["deleted"] == []
    # the GC: under the high mark nothing goes; over it, the unused image goes (LRU first),
    # the used one and the layer they share stay whole
    gc = ImageGCConfig(high_percent=85, low_percent=80, min_age=0)
    assert store.gc(gc, usage=lambda: (100, 50))["deleted"] == []
    out = store.gc(gc, usage=lambda: (100, 90))
    assert out["deleted"] == [two.id] and out["reclaimed"] > 0
    assert [i.id for i in store.ls()] == [one.id]
    assert all(d.is_dir() for d in store.layer_dirs(store.inspect(one.id)))
    # max age: an unused image older than it goes even with an empty disk
    two = c.pull(f"{env.basic.addr}/team/app:v2s2", store)  # (pulled again: whole)
    assert (store.layer_dirs(two)[0] / "etc").is_dir()
    aged = ImageGCConfig(max_age=60, min_age=0)
    assert store.gc(aged, usage=lambda: (100, 1))["deleted"] == []
    assert store.gc(aged, usage=lambda: (100, 1), now=time.time() + 120)["deleted"] == [two.id]
    # wanted by the cluster (a task still to start here) is kept like a used image
    used.clear()
    assert store.prune(all=True, wanted={one.id})["deleted"] == []
    assert store.prune(all=True)["deleted"] == [one.id]
    assert store.ls() == [] and not list((store.root / "layers").iterdir())
    assert not list((store.root / "blobs" / "sha256").iterdir())
    # a removal cut short by a crash leaves only tmp/trash-*, swept when the store opens
    (store.root / "tmp" / "trash-0123-dead").mkdir()
    store = ImageStore(tmp_path / "images")
    assert not list((store.root / "tmp").iterdir())
    assert c.pull(f"{env.basic.addr}/team/app:1", store).id == one.id


def test_push_uploads_what_is_missing_and_the_image_comes_back_the_same(env: Env,
                                                                       tmp_path: Path) -> None:
    """`image push` (shoal.runtime.regpush) to both registries: an image pulled here (a gzip
    and a zstd layer), tagged into another repository, goes up as an OCI manifest that skopeo
    reads and that pulls back into another store as the same layers and config; a second push
    finds every blob there; an anonymous push to the token registry, a digest target and an
    image this store lacks are refused, naming why."""
    import json
    import subprocess

    from shoal.runtime.errors import ImageError, ImageNotFound
    from shoal.runtime.regpush import push

    store = ImageStore(tmp_path / "images")
    for reg in (env.basic, env.token):
        c = env.client(reg)
        info = c.pull(f"{reg.addr}/team/app:1", store)
        target = f"{reg.addr}/pushed/copy:7"
        assert store.tag(info.id, target).id == info.id
        done = push(c, store, target)
        assert [s for _, s in done.blobs] == ["pushed"] * (len(info.layers) + 1)
        assert done.ref == target and done.digest.startswith("sha256:")
        again = push(c, store, target)
        assert (again.digest, {s for _, s in again.blobs}) == (done.digest, {"exists"})
        seen = subprocess.run([registryd.SKOPEO, "inspect", "--tls-verify=false", "--creds",
                               "alice:s3cret", f"docker://{target}"], capture_output=True,
                              text=True, timeout=60, check=True)
        doc = json.loads(seen.stdout)
        assert doc["Digest"] == done.digest and doc["Layers"] == list(info.layers), doc
        assert "MARKER=one" in doc["Env"]
        back = c.pull(target, ImageStore(tmp_path / f"back-{reg.port}"))
        assert (back.layers, back.config) == (info.layers, info.config)
        with pytest.raises(RegistryError, match="not a digest"):
            push(c, store, target, f"{reg.addr}/pushed/copy@{done.digest}")
    with pytest.raises(RegistryAuthError):
        push(env.client(env.token, creds=None), store, f"{env.token.addr}/pushed/copy:7",
             f"{env.token.addr}/anon/copy:1")
    with pytest.raises(ImageNotFound):
        push(env.client(env.basic), store, f"{env.basic.addr}/not/here:1")
    # credentials that may pull but not push (Docker Hub, someone else's repository): said so
    issuer = env.token.token
    real = issuer.token
    pull_only = pytest.MonkeyPatch()
    pull_only.setattr(issuer, "token", lambda user, access: real(user, [
        {**a, "actions": [x for x in a["actions"] if x == "pull"]} for a in access]))
    try:
        with pytest.raises(RegistryAuthError, match="denies a push to theirs/copy"):
            push(env.client(env.token), store, f"{env.token.addr}/pushed/copy:7",
                 f"{env.token.addr}/theirs/copy:1")
    finally:
        pull_only.undo()
    # a tag may not name a digest: only the image with that digest answers it
    with pytest.raises(ImageError, match="digest reference"):
        store.tag(f"{env.basic.addr}/pushed/copy:7", f"{env.basic.addr}/x@sha256:{'a' * 64}")
    # the config says the platform the node pulls (and so runs) as
    arm = RegistryClient(RegistryConfig(ca_file=str(env.basic.ca), platform="linux/arm64/v8"),
                         credentials=lambda _h: ("alice", "s3cret"))
    done = push(arm, store, f"{env.basic.addr}/pushed/copy:7", f"{env.basic.addr}/arm/copy:1")
    seen = subprocess.run([registryd.SKOPEO, "inspect", "--raw", "--config",
                           "--tls-verify=false", "--creds", "alice:s3cret",
                           f"docker://{env.basic.addr}/arm/copy:1"], capture_output=True,
                          text=True, timeout=60, check=True)
    config = json.loads(seen.stdout)
    assert (config["architecture"], config["variant"]) == ("arm64", "v8"), config


def test_an_upload_location_elsewhere_gets_no_credentials_and_never_plain_http(
        tmp_path: Path) -> None:
    """A registry's upload Location on another host (storage behind it) is sent the blob
    without our credentials; one that downgrades to plain HTTP is refused before anything
    is sent (a proxy that forgets X-Forwarded-Proto would otherwise get them in clear)."""
    import hashlib
    import ssl

    from shoal.runtime.reference import parse_reference

    seen: list[tuple[str, str | None]] = []
    where = {"location": ""}
    ca, cert, key = registryd.make_ca(tmp_path / "ca", ["127.0.0.1"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_a: Any) -> None:
            return None

        def reply(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self.reply(401 if not self.headers.get("Authorization") else 404,
                       {"WWW-Authenticate": 'Basic realm="r"'})

        def do_POST(self) -> None:
            if not self.headers.get("Authorization"):
                return self.reply(401, {"WWW-Authenticate": 'Basic realm="r"'})
            self.reply(202, {"Location": where["location"]})

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((f"{self.server.server_address[1]}{self.path}",  # type: ignore[index]
                         self.headers.get("Authorization")))
            self.reply(201)

    servers = []
    for tls in (True, True, False):  # the registry, its storage (TLS), a plain-HTTP one
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    registry, storage, plain = (int(s.server_address[1]) for s in servers)
    try:
        client = RegistryClient(RegistryConfig(ca_file=str(ca)),
                                credentials=lambda _h: ("alice", "s3cret"))
        ref = parse_reference(f"127.0.0.1:{registry}/team/app:1")
        digest = f"sha256:{hashlib.sha256(b'blob').hexdigest()}"
        where["location"] = f"https://127.0.0.1:{storage}/up/1?_state=x"
        assert client.upload_blob(ref, digest, b"blob")
        assert seen == [(f"{storage}/up/1?_state=x&digest=sha256%3A{digest[7:]}", None)]
        where["location"] = f"http://127.0.0.1:{plain}/up/2"
        with pytest.raises(RegistryUnreachable, match="plain HTTP"):
            client.upload_blob(ref, digest, b"blob")
        where["location"] = "/v2/team/app/blobs/uploads/3"  # (the usual: its own host)
        assert client.upload_blob(ref, digest, b"blob")
        assert seen[1:] == [(f"{registry}/v2/team/app/blobs/uploads/3?digest=sha256%3A"
                             f"{digest[7:]}", "Basic YWxpY2U6czNjcmV0")], seen
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_save_writes_an_archive_docker_skopeo_and_shoal_load_back(env: Env,
                                                                   tmp_path: Path) -> None:
    """`image save` (shoal.runtime.imagesave): images of the store (a gzip and a zstd layer,
    as pulled) as one tar — an OCI image layout with Docker's manifest.json — that loads
    back into another store as the same layers, config and tags, and that skopeo reads both
    as an OCI archive and as a docker-save archive; an image named twice is written once; a
    reference the store lacks is refused before anything is written."""
    import json
    import subprocess

    from shoal.runtime.errors import ImageNotFound
    from shoal.runtime.imagesave import save

    store = ImageStore(tmp_path / "images")
    c = env.client(env.basic)
    info = c.pull(f"{env.basic.addr}/team/app:1", store)
    store.tag(info.id, "mine/app:7")
    archive = tmp_path / "saved.tar"
    with archive.open("wb") as out:
        (written,) = save(store, ["mine/app:7", info.id.removeprefix("sha256:")[:12]], out)
    back = ImageStore(tmp_path / "back").load(archive)
    assert [(i.layers, i.config) for i in back] == [(info.layers, info.config)]
    import tarfile
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    names = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]]
    assert sorted(names) == sorted([f"{env.basic.addr}/team/app:1",
                                    "docker.io/mine/app:7"]), names  # (no digest reference)
    # (its tags, but not its digest reference: docker's RepoTags cannot hold one)
    tags = [t for t in store.inspect(info.id).tags if "@" not in t]
    assert sorted(back[0].tags) == sorted(tags) == sorted([f"{env.basic.addr}/team/app:1",
                                                           "mine/app:7"]), back[0].tags
    for transport in (f"oci-archive:{archive}:7", f"docker-archive:{archive}:mine/app:7"):
        seen = subprocess.run([registryd.SKOPEO, "inspect", transport], capture_output=True,
                              text=True, timeout=60)
        assert seen.returncode == 0, (transport, seen.stderr)
        doc = json.loads(seen.stdout)
        assert "MARKER=one" in doc["Env"] and len(doc["Layers"]) == len(info.layers), doc
    assert json.loads(subprocess.run(
        [registryd.SKOPEO, "inspect", f"oci-archive:{archive}:7"], capture_output=True,
        text=True, timeout=60, check=True).stdout)["Digest"] == written.digest
    empty = tmp_path / "none.tar"
    with empty.open("wb") as out, pytest.raises(ImageNotFound):
        save(store, ["mine/app:7", "not/here:1"], out)
    assert empty.stat().st_size == 0
