"""Unit tests of the registry client's pure parts: the reference grammar (and that the
service spec's image pattern accepts exactly the same strings), the WWW-Authenticate
challenge parser, and the image config fields the runtime honours."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.raft.spec import IMAGE_RE
from shoal.runtime.images import ImageConfig, normalize_ref
from shoal.runtime.reference import InvalidReference, has_registry_host, parse_reference
from shoal.runtime.registry import parse_challenges

D = "sha256:" + "ab" * 32

GOOD = [
    # text, registry, repository, tag, digest, familiar
    ("busybox", "docker.io", "library/busybox", "latest", "", "busybox:latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", "", "busybox:1.36"),
    ("user/app", "docker.io", "user/app", "latest", "", "user/app:latest"),
    ("docker.io/library/nginx:alpine", "docker.io", "library/nginx", "alpine", "",
     "nginx:alpine"),
    ("index.docker.io/x/y:1", "docker.io", "x/y", "1", "", "x/y:1"),
    ("REGISTRY:5000/team/app:1", "REGISTRY:5000", "team/app", "1", "",
     "REGISTRY:5000/team/app:1"),
    ("10.77.0.11:5000/team/app:1", "10.77.0.11:5000", "team/app", "1", "",
     "10.77.0.11:5000/team/app:1"),
    ("localhost/app", "localhost", "app", "latest", "", "localhost/app:latest"),
    ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", "",
     "localhost:5000/a/b/c:latest"),
    (f"reg.example.com/team/app@{D}", "reg.example.com", "team/app", "", D,
     f"reg.example.com/team/app@{D}"),
    (f"reg.example.com/team/app:1.2@{D}", "reg.example.com", "team/app", "1.2", D,
     f"reg.example.com/team/app:1.2@{D}"),
    ("my_app/x-y__z.w:V_1.0-rc", "docker.io", "my_app/x-y__z.w", "V_1.0-rc", "",
     "my_app/x-y__z.w:V_1.0-rc"),
]

BAD = [
    "", "app:", "app@sha256:short", ":tag", "/app", "app/", "a//b", "app:-x",
    "reg:5000/", "app@md5:" + "ab" * 16, " app", "app:" + "t" * 129, "-app", "app..x",
    "Team/App",
]


@pytest.mark.parametrize("text,registry,repo,tag,digest,familiar", GOOD)
def test_reference_grammar_parses_and_normalises(text: str, registry: str, repo: str,
                                                 tag: str, digest: str, familiar: str) -> None:
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert r.familiar() == familiar
    assert parse_reference(str(r)) == r  # printing and parsing again is stable
    assert IMAGE_RE.match(text), "the service spec must accept what the client parses"


@pytest.mark.parametrize("text", BAD)
def test_reference_grammar_refuses_malformed(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)
    assert not IMAGE_RE.match(text), "the service spec must refuse what the client refuses"


def test_names_over_255_characters_are_refused_by_client_and_spec() -> None:
    from shoal.raft.errors import ValidationError
    from shoal.raft.validate import validate_spec
    long = "reg:5000/" + "b" * 260 + ":1"
    with pytest.raises(InvalidReference, match="255"):
        parse_reference(long)
    with pytest.raises(ValidationError) as err:
        validate_spec({"name": "x", "task": {"container": {"image": long}}})
    assert err.value.field == "task.container.image"


def test_upper_case_repository_is_named_in_the_error() -> None:
    with pytest.raises(InvalidReference, match="lower-case"):
        parse_reference("reg:5000/Team/App:1")


def test_registry_host_is_explicit_only_with_a_domain_part() -> None:
    assert has_registry_host("reg:5000/team/app:1")
    assert has_registry_host("docker.io/library/busybox")
    assert has_registry_host("localhost/app")
    assert not has_registry_host("team/app:1")
    assert not has_registry_host("app:1")


def test_store_tags_use_the_familiar_form_and_a_digest_wins_over_a_tag() -> None:
    assert normalize_ref("busybox") == "busybox:latest"
    assert normalize_ref("docker.io/library/busybox:1") == "busybox:1"
    assert normalize_ref("reg:5000/team/app:1") == "reg:5000/team/app:1"
    assert normalize_ref(f"reg:5000/team/app:1@{D}") == f"reg:5000/team/app@{D}"
    assert parse_reference(f"reg:5000/team/app:1@{D}").store_tags == (
        "reg:5000/team/app:1", f"reg:5000/team/app@{D}")


# ------------------------------------------------------------------- auth challenges
def test_bearer_challenge_gives_realm_service_and_scope() -> None:
    h = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
         'scope="repository:team/app:pull"')
    assert parse_challenges(h) == [("bearer", {
        "realm": "https://auth.example.com/token", "service": "registry.example.com",
        "scope": "repository:team/app:pull"})]


def test_quoted_commas_escapes_and_case_are_handled() -> None:
    h = ('BEARER Realm="https://a/t?x=1,2" , Service=reg, '
         'scope="repository:a/b:pull,push repository:c:pull", error="say \\"hi\\""')
    [(scheme, p)] = parse_challenges(h)
    assert scheme == "bearer"
    assert p["realm"] == "https://a/t?x=1,2"
    assert p["service"] == "reg"
    assert p["scope"] == "repository:a/b:pull,push repository:c:pull"
    assert p["error"] == 'say "hi"'


def test_several_challenges_in_one_header() -> None:
    got = parse_challenges('Basic realm="Registry Realm", Bearer realm="https://t/",service=s')
    assert got == [("basic", {"realm": "Registry Realm"}),
                   ("bearer", {"realm": "https://t/", "service": "s"})]


@pytest.mark.parametrize("header", ["", "   ", ",,,", 'Bearer realm="unterminated', "=x"])
def test_malformed_challenges_never_raise(header: str) -> None:
    for scheme, params in parse_challenges(header):
        assert isinstance(scheme, str) and isinstance(params, dict)


# ------------------------------------------------------------------ image config
def test_image_config_reads_stop_signal_and_exposed_ports() -> None:
    cfg = ImageConfig.from_json({"Entrypoint": ["/bin/sh"], "StopSignal": "3",
                                 "ExposedPorts": {"80/tcp": {}, "53/udp": {}}})
    assert cfg.stop_signal == "SIGQUIT"
    assert sorted(cfg.exposed_ports) == [(53, "udp"), (80, "tcp")]
    assert ImageConfig.from_json({"StopSignal": "usr1"}).stop_signal == "SIGUSR1"
    # absent keys leave the stored form (and so image ids) as before
    assert "StopSignal" not in ImageConfig.from_json({"Cmd": ["x"]}).to_json()
    assert ImageConfig.from_json(cfg.to_json()) == cfg


def test_registry_secret_names_are_valid_secret_names() -> None:
    from shoal.node.registries import secret_name
    from shoal.raft.validate import validate_object_name
    for host in ("10.77.0.14:5000", "reg.example.com", "localhost:5000", "[::1]:5000",
                 "a-very-long-registry-host-name.internal.example.corporation.com:443"):
        name = secret_name(host)
        assert validate_object_name(name, "secret") == name
        assert name.startswith("registry-auth.")
    assert secret_name("10.77.0.14:5000") == "registry-auth.10.77.0.14-5000"


def test_pull_and_push_wait_for_the_agents_answer_longer_than_a_call(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The agent answers `image pull`/`image push` only when the transfer is done: the CLI
    waits up to TRANSFER_TIMEOUT for it, not its 60 s per call (a big image on a slow link
    would fail at 60 s). Then push prints docker push's lines."""
    import argparse

    from shoal.cli import registry as registry_cli

    class Client:
        timeout = 60.0
        seen: list[tuple[str, float]] = []

        def call(self, method: str, path: str, body: Any = None) -> Any:
            self.seen.append((path, self.timeout))
            if path == "/v1/images/push":
                return {"ref": "reg:5000/team/web:1", "digest": "sha256:" + "a" * 64,
                        "size": 558, "blobs": [{"digest": "sha256:" + "b" * 64,
                                                "status": "pushed"},
                                               {"digest": "sha256:" + "c" * 64,
                                                "status": "exists"}]}
            return [] if method == "GET" else {"id": "sha256:" + "d" * 64}

    c = Client()
    registry_cli.run_pull(c, argparse.Namespace(ref="reg:5000/team/web:1"), "table")
    registry_cli.run_push(c, argparse.Namespace(ref="reg:5000/team/web:1"), "table")
    waits = {path: t for path, t in c.seen if path in ("/v1/images/pull", "/v1/images/push")}
    assert waits == {"/v1/images/pull": registry_cli.TRANSFER_TIMEOUT,
                     "/v1/images/push": registry_cli.TRANSFER_TIMEOUT}
    out = capsys.readouterr().out.splitlines()
    assert out[-4:] == ["The push refers to repository [reg:5000/team/web]",
                        "bbbbbbbbbbbb: Pushed", "cccccccccccc: Layer already exists",
                        "1: digest: sha256:" + "a" * 64 + " size: 558"]
