"""`shoal stack deploy` of services with ``build:`` (shoal.cli.compose_build): the build's
keys read from the file (paths relative to the Compose file, then to the context; keys the
builder cannot apply warned about or refused by name), the builds run through the agent's
build API before any write, and each built service run by the content tag of its image, so
an unchanged rebuild redeploys nothing and a changed one rolls the service. The agent is a
fake: it records the requests and answers as the real one does."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from shoal.cli import stack as stackcli
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.raft.models import to_dict

ID1 = "sha256:" + "a1" * 32
ID2 = "sha256:" + "b2" * 32


def project(tmp_path: Path, compose: str, files: dict[str, str] | None = None) -> Path:
    """A project directory holding compose.yml and ``files``; the Compose file's path."""
    d = tmp_path / "proj"
    for rel, text in (files or {"Dockerfile": "FROM busybox:1\n"}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    (d / "compose.yml").write_text(compose)
    return d / "compose.yml"


class FakeAgent:
    """The API a deploy uses: builds answer with ``image_id`` (or ``error``), images by tag,
    services kept as the managers would."""

    def __init__(self, image_id: str = ID1, error: str = "") -> None:
        self.image_id, self.error = image_id, error
        # {"query", "files": {name: bytes}, "secrets": {id: base64}}
        self.builds: list[dict[str, Any]] = []
        self.tags: dict[str, str] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []

    def stream(self, path: str, method: str = "GET", body: Any = None,
               headers: Any = None) -> Iterator[dict[str, Any]]:
        assert (method, urlsplit(path).path) == ("POST", "/v1/images/build")
        raw = body.read()
        head = int((headers or {}).get("X-Shoal-Build-Secrets", 0))
        assert len(raw) == int(headers["Content-Length"])
        secrets, raw = (json.loads(raw[:head]) if head else {}), raw[head:]
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            files = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                     for m in tar.getmembers() if m.isfile()}
        query = parse_qsl(urlsplit(path).query)
        self.builds.append({"query": query, "files": files, "secrets": secrets})
        yield {"stream": "Step 1/1 : FROM busybox:1"}
        if self.error:
            yield {"error": self.error, "line": 1}
            return
        for k, v in query:
            if k == "t":
                self.tags[v if ":" in v else v + ":latest"] = self.image_id
        yield {"image": self.image_id, "tags": [], "steps": 1, "cached": 0,
               "layers_created": 0, "images_created": 0}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        from urllib.parse import unquote

        if (method, path) == ("POST", "/v1/images/tag"):
            self.tags[body["target"]] = body["source"]
            return {}
        if method == "GET" and path.startswith("/v1/images/"):
            ref = unquote(path[len("/v1/images/"):])
            if ref not in self.tags:
                raise CliError(f"no such image: {ref}")
            return {"id": self.tags[ref]}
        if (method, path) == ("GET", "/v1/info"):  # (it takes build secrets)
            return {"hostname": "n1", "features": ["build-secrets"]}
        if (method, path) == ("GET", "/v1/services"):
            return [{"id": n, "name": n} for n in self.services]
        if method == "GET" and path.startswith("/v1/services/"):
            return self.services[path.rsplit("/", 1)[1]]
        if method == "GET":
            return []
        self.writes.append((method, path))
        if (method, path) == ("POST", "/v1/services") or path.endswith("/update"):
            spec = body["spec"]
            self.services[spec["name"]] = {"id": spec["name"], "name": spec["name"],
                                           "spec": spec, "version": 1}
        return {}

    def image_of(self, service: str) -> str:
        return str(self.services[service]["spec"]["task"]["container"]["image"])


def deploy(agent: FakeAgent, path: Path, no_build: bool = False) -> tuple[stackcli.Plan, str]:
    out = io.StringIO()
    plan = stackcli.deploy(agent, [path], "app", False, "always", out=out, err=io.StringIO(),
                           no_build=no_build)
    return plan, out.getvalue()


# ----------------------------------------------------------------------------- reading

def test_a_build_context_is_the_compose_files_directory_and_the_dockerfile_the_contexts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project(tmp_path, """
services:
  web:
    build: ./web
  api:
    image: reg:5000/api:2
    build:
      context: api
      dockerfile: docker/Dockerfile.prod
      args: [VERSION=1.2, FROM_ENV, NOT_SET]
      labels: {team: core}
      tags: [api:edge]
  worker:
    build: {args: {N: 3, DEBUG: false, FROM_ENV: null}}
""", {"web/Dockerfile": "FROM busybox:1\n", "api/docker/Dockerfile.prod": "FROM x\n",
      "Dockerfile": "FROM y\n"})
    monkeypatch.chdir(tmp_path)  # (not the project: paths are the file's, not the shell's)
    st = load_stack("app", [path], {"FROM_ENV": "e"})
    web, api, worker = st.builds
    assert (web.context, web.dockerfile, web.name) == (path.parent / "web", None,
                                                       "app_web:latest")
    assert api.context == path.parent / "api"
    assert api.dockerfile == path.parent / "api/docker/Dockerfile.prod"
    assert api.args == ("VERSION=1.2", "FROM_ENV=e")  # (a name alone: the environment's)
    assert (api.labels, api.tags, api.name) == (("team=core",), ("api:edge",),
                                                "reg:5000/api:2")
    assert worker.context == path.parent and worker.args == ("N=3", "DEBUG=false",
                                                              "FROM_ENV=e")
    # until built, a service's image is the build's name
    images = {s.name: s.task.container.image for s in st.services}
    assert images == {"app_web": "app_web:latest", "app_api": "reg:5000/api:2",
                      "app_worker": "app_worker:latest"}
    assert not st.warnings


def test_build_keys_the_builder_cannot_apply_are_warned_by_name_or_refused(
        tmp_path: Path) -> None:
    st = load_stack("app", [project(tmp_path, """
services:
  web: {build: {context: ., cache_from: [web:cache], platforms: [linux/arm64]}}
  api: {build: {context: ., cache_from: [api:cache], x-note: skipped}}
""")], {})
    assert sorted(st.warnings) == [
        "build.cache_from: not applied: the layer cache is the building node's own "
        "(services web, api)",
        "build.platforms: not applied: the image is built for the building node's platform "
        "(service web)"]
    for build, error in (
            ("{target: 'a b'}", "services.web.build.target: 'a b' is not a stage name"),
            ("{additional_contexts: {a: ./a}}", "services.web.build.additional_contexts: "),
            ("{contxt: .}", "services.web.build.contxt: unknown key"),
            ("https://github.com/x/y.git", "services.web.build.context: a remote context"),
            ("{args: [BAD-NAME=1]}", "services.web.build.args.BAD-NAME: "),
            ("{args: {A: [1]}}", "services.web.build.args.A: expected a string"),
            ("{dockerfile: a, dockerfile_inline: 'FROM x'}",
             "services.web.build.dockerfile_inline: dockerfile and dockerfile_inline"),
            ("{no_cache: maybe}", "services.web.build.no_cache: expected true or false"),
            ("{network: backend}", "services.web.build.network: 'backend' is not a network "
                                   "shoal's builder can give RUN: default, none or host"),
            ("{network: [host]}", "services.web.build.network: expected a string"),
            ("[.]", "services.web.build: expected a mapping")):
        with pytest.raises(ComposeError) as exc:
            load_stack("app", [project(tmp_path, f"services:\n  web: {{build: {build}}}\n")],
                       {})
        assert str(exc.value).startswith(error), (build, str(exc.value))
    with pytest.raises(ComposeError, match=r"^services.web.image: a built image is tagged"):
        load_stack("app", [project(tmp_path, "services:\n  web: {build: ., image: "
                                   f"'x@{ID1}'}}\n")], {})


def test_build_secrets_are_the_top_level_secrets_sent_with_the_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``build.secrets`` (short and long form) → `image build --secret`'s: the bytes of the
    file's top-level secrets (file: and environment:) go in the build request under the id
    the Dockerfile uses (``target``), never in its query; a secret only builds use is not
    created in the cluster, one a service uses too is."""
    import base64

    path = project(tmp_path, """
services:
  web:
    build:
      context: .
      secrets: [npmrc, {source: token, target: gh, mode: 0400}]
    secrets: [shared]
  api: {build: {context: ., secrets: [shared]}}
secrets:
  npmrc: {file: ./npmrc.txt}
  token: {environment: GH_TOKEN}
  shared: {file: ./npmrc.txt}
""", {"Dockerfile": "FROM busybox:1\n", "npmrc.txt": "npm-auth-bytes\n"})
    st = load_stack("app", [path], {"GH_TOKEN": "ghp-secret"})
    assert [o.key for o in st.secrets] == ["shared"]
    assert st.warnings == ["build.secrets.mode: not applied: a build secret's owner and mode "
                           "are its RUN --mount=type=secret's uid=, gid=, mode= (service web)"]
    assert "npm-auth-bytes" not in repr(st.builds)
    agent = FakeAgent()
    monkeypatch.setenv("GH_TOKEN", "ghp-secret")
    deploy(agent, path)
    sent = [{k: base64.b64decode(v) for k, v in b["secrets"].items()} for b in agent.builds]
    assert sent == [{"npmrc": b"npm-auth-bytes\n", "gh": b"ghp-secret"},
                    {"shared": b"npm-auth-bytes\n"}]
    assert not any("secret" in str(b["query"]) for b in agent.builds)
    for build, error in (
            ("{secrets: [nope]}", "services.web.build.secrets[0]: no secret 'nope'"),
            ("{secrets: [ext]}", "services.web.build.secrets[0]: secret 'ext' is external"),
            ("{secrets: [{source: s, target: 'a/b'}]}",
             "services.web.build.secrets[0].target: 'a/b' is not a secret id"),
            ("{secrets: [{source: s, colour: red}]}",
             "services.web.build.secrets[0].colour: unknown key"),
            ("{secrets: s}", "services.web.build.secrets: must be a list")):
        with pytest.raises(ComposeError) as exc:
            load_stack("app", [project(tmp_path, f"services:\n  web: {{build: {build}}}\n"
                                       "secrets:\n  ext: {external: true}\n"
                                       "  s: {file: ./npmrc.txt}\n",
                                       {"npmrc.txt": "x", "Dockerfile": "FROM a\n"})], {})
        assert str(exc.value).startswith(error), (build, str(exc.value))


def test_stack_config_prints_build_as_written(tmp_path: Path, capsys: Any) -> None:
    text = stackcli.config_text([project(tmp_path, """
services:
  web:
    build: {context: ./web, args: [A=1]}
""")], {})
    assert "build:\n      context: ./web\n      args:\n      - A=1\n" in text
    assert "image" not in text


# ----------------------------------------------------------------------------- deploying

def test_a_built_service_runs_the_content_tag_of_its_image(tmp_path: Path) -> None:
    """Built on the agent (the context packed from the file's directory, the Dockerfile,
    args and network sent), tagged with its name and with STACK_SERVICE:HEX, deployed with
    the latter; the same image again redeploys nothing; a changed one rolls the service."""
    path = project(tmp_path, """
services:
  web:
    build: {context: ./web, dockerfile: build/Dockerfile, args: {V: 1}, labels: [a=b],
            network: host, target: Prod}
    image: myorg/web:1
  db: {image: postgres:16}
""", {"web/build/Dockerfile": "FROM busybox:1\nCOPY app.txt /\n", "web/app.txt": "v1"})
    agent = FakeAgent(ID1)
    plan, out = deploy(agent, path)
    [b] = agent.builds
    assert b["files"] == {"build/Dockerfile": b"FROM busybox:1\nCOPY app.txt /\n",
                          "app.txt": b"v1"}
    assert ("t", "myorg/web:1") in b["query"] and ("dockerfile", "build/Dockerfile") in \
        b["query"] and ("buildarg", "V=1") in b["query"] and ("label", "a=b") in b["query"]
    assert ("network", "host") in b["query"]  # (build.network: RUN's, as --network)
    assert ("target", "Prod") in b["query"]  # (the stage the content tag's image is)
    assert agent.image_of("app_web") == "app_web:" + ID1[7:19]
    assert agent.tags["app_web:" + ID1[7:19]] == ID1 and agent.image_of("app_db") == \
        "postgres:16"
    assert "Building service web" in out and "Step 1/1 : FROM busybox:1" in out
    assert [s.name for s in plan.create] == ["app_web", "app_db"]

    plan, _ = deploy(agent, path)  # rebuilt: the same image
    assert len(agent.builds) == 2 and not plan.update and not plan.create
    assert sorted(plan.unchanged) == ["app_db", "app_web"]

    agent.image_id = ID2  # rebuilt: another image
    plan, _ = deploy(agent, path)
    assert [s.name for s, _ in plan.update] == ["app_web"] and plan.unchanged == ["app_db"]
    assert agent.image_of("app_web") == "app_web:" + ID2[7:19]


def test_a_failed_build_stops_the_deploy_before_any_write(tmp_path: Path) -> None:
    path = project(tmp_path, """
services:
  db: {image: postgres:16}
  web: {build: .}
""")
    agent = FakeAgent(error="COPY app.txt: no such file in the context")
    with pytest.raises(CliError) as exc:
        deploy(agent, path)
    assert str(exc.value).startswith("services.web.build: build failed: COPY app.txt: no "
                                     "such file")
    assert agent.writes == []
    # a missing context or Dockerfile: said before any build
    path = project(tmp_path, """
services:
  web: {build: .}
  api: {build: {context: ./api}}
""")
    agent = FakeAgent()
    with pytest.raises(ComposeError, match=r"^services.api.build.context: .*/api is not a "
                       "directory"):
        deploy(agent, path)
    assert agent.builds == [] and agent.writes == []


def test_no_build_deploys_the_image_built_before_under_its_name(tmp_path: Path) -> None:
    path = project(tmp_path, "services:\n  web: {build: ./gone}\n")
    agent = FakeAgent()
    with pytest.raises(CliError, match=r"^services.web.build: --no-build, and there is no "
                       "image app_web:latest on this node"):
        deploy(agent, path, no_build=True)
    assert agent.writes == []
    agent.tags["app_web:latest"] = ID2  # (`shoal image build -t app_web ./web`)
    deploy(agent, path, no_build=True)
    assert agent.builds == [] and agent.image_of("app_web") == "app_web:" + ID2[7:19]
    # with image: the image under that name, else image: as written (docker stack deploy's)
    path = project(tmp_path, "services:\n  web: {build: ., image: 'reg:5000/web:1'}\n")
    deploy(agent, path, no_build=True)
    assert agent.image_of("app_web") == "reg:5000/web:1"
    agent.tags["reg:5000/web:1"] = ID1
    deploy(agent, path, no_build=True)
    assert agent.builds == [] and agent.image_of("app_web") == "app_web:" + ID1[7:19]


def test_the_content_tag_survives_the_spec_round_trip(tmp_path: Path) -> None:
    """(what the managers hold compares equal to what the next deploy translates)"""
    st = load_stack("app", [project(tmp_path, "services:\n  web: {build: .}\n")], {})
    from shoal.cli.compose_build import with_images
    [spec] = with_images(st.services, "app", {"web": "app_web:" + ID1[7:19]})
    assert to_dict(spec)["task"]["container"]["image"] == "app_web:a1a1a1a1a1a1"
    assert json.dumps(to_dict(spec))


def test_an_inline_dockerfile_is_sent_with_the_context_and_not_left_behind(
        tmp_path: Path) -> None:
    path = project(tmp_path, """
services:
  web:
    build:
      context: .
      dockerfile_inline: |
        FROM busybox:1
        COPY app.txt /
""", {"app.txt": "x"})
    agent = FakeAgent()
    before = set(Path(tempfile.gettempdir()).glob("shoal-*"))
    deploy(agent, path)
    [b] = agent.builds
    assert ("dockerfile", ".shoal-dockerfile") in b["query"]
    assert b["files"][".shoal-dockerfile"] == b"FROM busybox:1\nCOPY app.txt /\n"
    assert set(Path(tempfile.gettempdir()).glob("shoal-*")) == before
