"""Compose's ``extends:`` (shoal.cli.compose_extends): a service deployed with every key it
takes from the one it extends — from the same file or another one, whose relative paths
still name its own files — as `docker compose` reads it; `stack config` prints the file with
extends resolved; what cannot be resolved is refused naming the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal.cli.compose import ComposeError, Stack, load, load_stack
from shoal.cli.stack import config_text
from shoal.raft.spec import ServiceSpec


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def deploy(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Stack:
    return load_stack("app", [write(tmp_path / "compose.yml", text)], env or {})


def svc(stack: Stack, key: str) -> ServiceSpec:
    return next(s for s in stack.services if s.name == f"app_{key}")


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ComposeError) as exc:
        deploy(tmp_path, text)
    return str(exc.value)


# ----------------------------------------------------------------------------- same file

@pytest.mark.parametrize("extends", ["base", "{service: base}"])
def test_a_service_gets_the_keys_of_the_one_it_extends_in_the_same_file(
        tmp_path: Path, extends: str) -> None:
    st = deploy(tmp_path, f"""
services:
  base:
    image: zabbix/server:7
    environment: {{TZ: utc, PORT: "80"}}
    read_only: true
  server:
    extends: {extends}
    environment: [PORT=8080]
""")
    server = svc(st, "server")
    assert server.task.container.image == "zabbix/server:7"
    assert server.task.container.env == {"TZ": "utc", "PORT": "8080"}
    assert server.task.container.read_only is True
    assert svc(st, "base").task.container.env == {"TZ": "utc", "PORT": "80"}


def test_a_chain_is_resolved_from_its_end(tmp_path: Path) -> None:
    """The spec's example: cli gets user from base through common."""
    st = deploy(tmp_path, """
services:
  cli: {extends: {service: common}}
  common: {image: busybox, extends: {service: base}}
  base: {image: alpine, user: root, command: [sleep, "1"]}
""")
    cli = svc(st, "cli")
    assert (cli.task.container.image, cli.task.container.user) == ("busybox", "root")
    assert cli.task.container.command == ("sleep", "1")


# ----------------------------------------------------------------------------- merging

def test_merge_environment_ports_volumes_and_labels_by_the_specs_rules(
        tmp_path: Path) -> None:
    """Maps merge (the extending service's key wins); ports and volumes add the extending
    service's items, one with the same identity (a port's published/target/protocol, a
    mount's target) replacing the base's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    st = deploy(tmp_path, """
services:
  common:
    image: busybox
    environment: [TZ=utc, PORT=80]
    ports: ["8080:80", "9000:9000"]
    volumes: ["common-volume:/var/lib/backup/data:rw", "./a:/a"]
    labels: {tier: back, team: ops}
  cli:
    extends: common
    environment: {PORT: "8080"}
    ports: ["8080:80", "9443:443"]
    volumes: ["cli-volume:/var/lib/backup/data:ro", "./b:/b"]
    labels: [tier=front]
volumes: {common-volume: {}, cli-volume: {}}
""")
    c = svc(st, "cli")
    assert c.task.container.env == {"TZ": "utc", "PORT": "8080"}
    assert sorted((p.published, p.target) for p in c.endpoint.ports) == [
        (8080, 80), (9000, 9000), (9443, 443)]
    mounts = {m.target: (m.source, m.readonly) for m in c.task.container.mounts}
    assert mounts == {"/var/lib/backup/data": ("app_cli-volume", True),
                      "/a": (str(tmp_path / "a"), False), "/b": (str(tmp_path / "b"), False)}
    assert c.task.container.labels == {"tier": "front", "team": "ops"}


MERGE_BASE = """
services:
  base:
    image: app:1
    build: ./src
    env_file: a.env
    tmpfs: /tmp
    command: [serve, --port, "80"]
    healthcheck: {test: [CMD, probe, a], interval: 5s}
    sysctls: [net.core.somaxconn=1024, net.ipv4.tcp_syncookies=0]
    networks: {back: {aliases: [db-client]}}
    deploy: {placement: {constraints: [node.role==worker]}}
"""
MERGE_OVER = """
    build: {args: {V: "2"}}
    env_file: [b.env]
    tmpfs: /run
    command: [serve]
    healthcheck: {test: [CMD, probe, b]}
    sysctls: {net.ipv4.tcp_syncookies: 1}
    networks: {back: {aliases: [api]}}
    deploy: {placement: {constraints: [node.labels.zone==a]}}
"""
MERGED = {
    "image": "app:1", "build": {"context": "./src", "args": {"V": "2"}},
    "env_file": ["a.env", "b.env"], "tmpfs": ["/tmp", "/run"], "command": ["serve"],
    "healthcheck": {"test": ["CMD", "probe", "b"], "interval": "5s"},
    "sysctls": {"net.core.somaxconn": "1024", "net.ipv4.tcp_syncookies": 1},
    "networks": {"back": {"aliases": ["db-client", "api"]}},
    "deploy": {"placement": {"constraints": ["node.role==worker", "node.labels.zone==a"]}}}


def test_merge_a_string_with_a_list_lists_and_commands_as_compose_does(
        tmp_path: Path) -> None:
    """compose-go's merge (shared by extends and override files): a string env_file/tmpfs
    is a list of one, ``build: DIR`` a context, sysctls a map; other lists of a service
    (aliases, constraints) append; command and healthcheck.test are replaced."""
    doc, _, _, _ = load([write(tmp_path / "compose.yml", MERGE_BASE + """
  web:
    extends: base""" + MERGE_OVER)], {})
    assert doc["services"]["web"] == MERGED


def test_override_files_merge_by_the_same_rules(tmp_path: Path) -> None:
    base = write(tmp_path / "compose.yml", MERGE_BASE)
    over = write(tmp_path / "over.yml", "services:\n  base:" + MERGE_OVER)
    doc, _, _, _ = load([base, over], {})
    assert doc["services"]["base"] == MERGED


# ----------------------------------------------------------------------------- other files

def test_a_service_from_another_directory_keeps_its_files(tmp_path: Path) -> None:
    """env_file, the build context and bind sources of a service taken from common/base.yml
    are relative to common/, as `docker compose` reads them; the extending service's own
    paths stay relative to the project."""
    write(tmp_path / "common/env/db.env", "DB=from-common\nPORT=1\n")
    write(tmp_path / "common/src/Dockerfile", "FROM scratch\n")
    (tmp_path / "common/data").mkdir()
    (tmp_path / "mine").mkdir()
    write(tmp_path / "common/base.yml", """
services:
  app:
    build: ./src
    env_file: [env/db.env]
    volumes: ["./data:/data", {type: bind, source: data, target: /long}]
""")
    st = deploy(tmp_path, """
services:
  web:
    extends: {file: common/base.yml, service: app}
    environment: {PORT: "8080"}
    volumes: ["./mine:/mine"]
""")
    web = svc(st, "web")
    assert web.task.container.env == {"DB": "from-common", "PORT": "8080"}
    mounts = {m.target: m.source for m in web.task.container.mounts}
    assert mounts == {"/data": str(tmp_path / "common/data"),
                      "/long": str(tmp_path / "common/data"), "/mine": str(tmp_path / "mine")}
    (build,) = st.builds
    assert build.context == tmp_path / "common/src"


def test_a_chain_across_directories_resolves_each_file_from_its_own(tmp_path: Path) -> None:
    """compose.yml → common/mid.yml → common/deep/base.yml: extends.file and env_file of
    each are relative to that file's directory."""
    write(tmp_path / "common/deep/base.env", "FROM=deep\n")
    write(tmp_path / "common/deep/base.yml", """
services:
  base: {image: alpine, env_file: base.env}
""")
    write(tmp_path / "common/mid.yml", """
services:
  mid:
    extends: {file: deep/base.yml, service: base}
    user: nobody
""")
    web = svc(deploy(tmp_path, """
services:
  web: {extends: {file: common/mid.yml, service: mid}}
"""), "web")
    assert (web.task.container.image, web.task.container.user) == ("alpine", "nobody")
    assert web.task.container.env == {"FROM": "deep"}


def test_a_zabbix_like_file_deploys_with_its_components(tmp_path: Path) -> None:
    """Zabbix's layout (zabbix/zabbix-docker): each service extends one of
    compose_zabbix_components.yaml, which extends another of the same file; env files
    named by variables of the project's .env; the extending file adds volumes and labels."""
    write(tmp_path / ".env", "ENV_VARS_DIRECTORY=./env_vars\nDATA_DIRECTORY=./zbx_env\n"
          "ZABBIX_SERVER_PORT=10051\n")
    write(tmp_path / "env_vars/.env_srv", "ZBX_CACHESIZE=64M\n")
    write(tmp_path / "env_vars/.env_db_mysql", "DB_SERVER_HOST=mysql-server\n")
    write(tmp_path / "compose_zabbix_components.yaml", """
services:
 server:
  ports: [{target: 10051, published: "${ZABBIX_SERVER_PORT}", protocol: tcp}]
  volumes: [/etc/localtime:/etc/localtime:ro, "${DATA_DIRECTORY}/export:/export:rw"]
  env_file:
   - ${ENV_VARS_DIRECTORY}/.env_srv
   - path: ${ENV_VARS_DIRECTORY}/.env_srv_override
     required: false
  networks: {backend: {aliases: [zabbix-server]}}
  labels: {com.zabbix.company: "Zabbix LLC"}
 server-mysql:
  extends: {service: server}
  env_file: [ "${ENV_VARS_DIRECTORY}/.env_db_mysql" ]
""")
    st = deploy(tmp_path, """
services:
 zabbix-server:
  extends: {file: compose_zabbix_components.yaml, service: server-mysql}
  image: zabbix/zabbix-server-mysql:alpine-7.0-latest
  volumes: [/etc/timezone:/etc/timezone:ro]
  labels: {com.zabbix.os: alpine}
networks: {backend: {}}
""")
    z = svc(st, "zabbix-server")
    assert z.task.container.env == {"ZBX_CACHESIZE": "64M", "DB_SERVER_HOST": "mysql-server"}
    assert [(p.published, p.target) for p in z.endpoint.ports] == [(10051, 10051)]
    assert sorted(m.target for m in z.task.container.mounts) == [
        "/etc/localtime", "/etc/timezone", "/export"]
    assert z.task.container.labels == {"com.zabbix.company": "Zabbix LLC",
                                       "com.zabbix.os": "alpine"}
    assert list(z.task.networks) == ["app_backend"]


def test_the_base_file_is_interpolated_with_the_projects_variables(tmp_path: Path) -> None:
    write(tmp_path / "common/base.yml", "services:\n  app: {image: 'alpine:${TAG}', "
          "user: '${WHO}'}\n")
    doc, _, _, warnings = load([write(tmp_path / "compose.yml", """
services:
  web: {extends: {file: common/base.yml, service: app}}
""")], {"TAG": "3.20"})
    assert doc["services"]["web"] == {"image": "alpine:3.20", "user": ""}
    assert any("WHO" in w and "common/base.yml: services.app.user" in w for w in warnings)


def test_extends_is_resolved_in_each_file_before_overrides_merge(tmp_path: Path) -> None:
    """As compose-go: an override file's service may extend one of its own file; the
    override's keys then merge onto the base file's resolved service."""
    base = write(tmp_path / "compose.yml", """
services:
  base: {image: alpine, environment: {A: "1"}}
  web: {extends: base, environment: {B: "2"}}
""")
    over = write(tmp_path / "override.yml", """
services:
  tmpl: {image: nginx, environment: {C: "3"}}
  web: {extends: tmpl}
""")
    st = load_stack("app", [base, over], {})
    assert svc(st, "web").task.container.image == "nginx"
    assert svc(st, "web").task.container.env == {"A": "1", "B": "2", "C": "3"}


# ----------------------------------------------------------------------------- stack config

def test_stack_config_prints_the_file_with_extends_resolved(tmp_path: Path) -> None:
    write(tmp_path / "common/base.yml", """
services:
  app: {image: app:1, env_file: [env/a.env], volumes: ["./data:/data", "named:/n"]}
""")
    compose = write(tmp_path / "compose.yml", """
services:
  web:
    extends: {file: common/base.yml, service: app}
    image: web:2
""")
    printed = yaml.safe_load(config_text([compose], {}))
    assert printed["services"]["web"] == {
        "image": "web:2", "env_file": ["./common/env/a.env"],
        "volumes": ["./common/data:/data", "named:/n"]}


# ----------------------------------------------------------------------------- refusals

def test_a_cycle_is_an_error_naming_its_services(tmp_path: Path) -> None:
    msg = error(tmp_path, """
services:
  a: {image: x, extends: b}
  b: {image: x, extends: {service: c}}
  c: {image: x, extends: a}
""")
    assert msg.startswith("services.a.extends: a cycle: a → b → c → a"), msg
    msg = error(tmp_path, "services:\n  a: {image: x, extends: a}\n")
    assert msg.startswith("services.a.extends: a cycle: a → a"), msg


def test_a_cycle_across_files_names_the_files(tmp_path: Path) -> None:
    write(tmp_path / "other.yml", """
services:
  b: {image: x, extends: {file: compose.yml, service: a}}
""")
    msg = error(tmp_path, """
services:
  a: {image: x, extends: {file: other.yml, service: b}}
""")
    assert msg.startswith("services.a.extends: a cycle: a → other.yml:b → "), msg


@pytest.mark.parametrize(("extends", "path", "says"), [
    ("nope", "services.web.extends.service", "no service 'nope' in this file"),
    ("{file: base.yml, service: nope}", "services.web.extends.service",
     "no service 'nope' in base.yml"),
    ("{file: missing.yml, service: app}", "services.web.extends.file",
     "cannot read missing.yml: No such file or directory"),
    ("{file: base.yml}", "services.web.extends.service", "is required"),
    ("{service: app, files: base.yml}", "services.web.extends.files", "unknown key"),
    ("[app]", "services.web.extends", "expected a service name or a mapping"),
    ("{file: 'https://example.com/c.yml', service: app}", "services.web.extends.file",
     "a remote file is not supported"),
])
def test_what_cannot_be_resolved_is_refused_naming_the_path(
        tmp_path: Path, extends: str, path: str, says: str) -> None:
    write(tmp_path / "base.yml", "services:\n  app: {image: alpine}\n")
    msg = error(tmp_path, f"services:\n  web:\n    extends: {extends}\n")
    assert msg.startswith(f"{path}: ") and says in msg, msg


def test_an_error_in_another_file_names_that_file(tmp_path: Path) -> None:
    write(tmp_path / "common/base.yml", "services:\n  mid: {extends: gone}\n")
    msg = error(tmp_path, "services:\n  web: {extends: {file: common/base.yml, "
                "service: mid}}\n")
    assert msg.startswith("common/base.yml: services.mid.extends.service: no service "
                          "'gone' in common/base.yml"), msg
