"""Compose files as real projects write them (a sweep of docker/awesome-compose, the Airflow,
Sentry, Zabbix and docker-mailserver files...): what `stack deploy` makes of the keys they
use that docker stack deploy refuses or Compose reads differently — ``extends``, ``profiles``
— and messages that show the value they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.cli.compose import ComposeError, Stack, load_stack


def deploy(tmp_path: Path, text: str, env: dict[str, str] | None = None,
           dotenv: str = "") -> Stack:
    (tmp_path / "compose.yml").write_text(text)
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    return load_stack("app", [tmp_path / "compose.yml"], env or {})


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ComposeError) as exc:
        deploy(tmp_path, text)
    return str(exc.value)


# ----------------------------------------------------------------------------- extends

@pytest.mark.parametrize("extends", ["{file: common.yml, service: base}", "{service: base}",
                                     "base"])
def test_extends_deploys_the_service_with_what_it_extends(
        tmp_path: Path, extends: str) -> None:
    """Zabbix's files take most of each service (env files, volumes, networks) from
    ``extends``: once refused (as docker stack deploy does: "Support for `extends` is not
    implemented yet"), it is resolved as `docker compose` does (tests/test_compose_extends.py
    for the rules)."""
    (tmp_path / "common.yml").write_text("services:\n  base: {image: zabbix/server:7, "
                                         "read_only: true, environment: [A=1]}\n")
    st = deploy(tmp_path, f"""
services:
  base: {{image: zabbix/server:7, read_only: true, environment: [A=1]}}
  server:
    extends: {extends}
    environment: {{B: "2"}}
""")
    server = next(s for s in st.services if s.name == "app_server")
    assert server.task.container.image == "zabbix/server:7"
    assert server.task.container.read_only is True
    assert server.task.container.env == {"A": "1", "B": "2"}


# ----------------------------------------------------------------------------- profiles

AIRFLOW = """
services:
  postgres: {image: postgres:16}
  scheduler: {image: apache/airflow:3, command: scheduler}
  flower: {image: apache/airflow:3, command: celery flower, profiles: [flower]}
  cli: {image: apache/airflow:3, command: [bash, -c, airflow], profiles: [debug]}
"""


def test_a_service_whose_profiles_are_not_active_is_not_deployed(tmp_path: Path) -> None:
    """As `docker compose up` (Airflow's ``airflow-cli``, a one-shot, would otherwise run
    as a service restarting forever): a service with ``profiles:`` is deployed only when
    one of them is active, and the warning names what was left out."""
    st = deploy(tmp_path, AIRFLOW)
    assert sorted(s.name for s in st.services) == ["app_postgres", "app_scheduler"]
    assert "profiles: not deployed: none of their profiles is active (COMPOSE_PROFILES, as " \
        "docker compose) (services flower, cli)" in st.warnings


@pytest.mark.parametrize(("env", "dotenv", "deployed"), [
    ({"COMPOSE_PROFILES": "flower"}, "", ["app_flower", "app_postgres", "app_scheduler"]),
    ({}, "COMPOSE_PROFILES=debug, flower\n",  # (Sentry's .env sets it)
     ["app_cli", "app_flower", "app_postgres", "app_scheduler"]),
    ({"COMPOSE_PROFILES": "*"}, "", ["app_cli", "app_flower", "app_postgres",
                                     "app_scheduler"]),
])
def test_compose_profiles_from_the_environment_or_dotenv_activates_profiles(
        tmp_path: Path, env: dict[str, str], dotenv: str, deployed: list[str]) -> None:
    st = deploy(tmp_path, AIRFLOW, env, dotenv)
    assert sorted(s.name for s in st.services) == deployed
    left_out = sorted({"app_cli", "app_flower"} - set(deployed))
    said = [w for w in st.warnings if w.startswith("profiles:")]
    assert said == ([f"profiles: not deployed: none of their profiles is active "
                     f"(COMPOSE_PROFILES, as docker compose) (service {left_out[0][4:]})"]
                    if left_out else [])


def test_profiles_must_be_a_list_of_names_and_some_service_must_remain(
        tmp_path: Path) -> None:
    assert error(tmp_path, "services:\n  w: {image: a, profiles: [[x]]}\n") \
        .startswith("services.w.profiles[0]: expected a string")
    msg = error(tmp_path, "services:\n  w: {image: a, profiles: [debug]}\n")
    assert msg.startswith("services: no service to deploy: every one has profiles: and "
                          "none of them is active (COMPOSE_PROFILES is not set)"), msg


# ----------------------------------------------------------------------------- messages

@pytest.mark.parametrize(("body", "said"), [
    # Airflow's documentation template (|version| replaced by their docs build)
    ("image: 'apache/airflow:|version|'",
     "services.web.image: invalid value 'apache/airflow:|version|': image "),
    # MinIO's `image: minio/minio:${RELEASE}` with RELEASE unset
    ("image: 'minio/minio:'", "services.web.image: invalid value 'minio/minio:': image "),
])
def test_an_invalid_value_is_shown_in_the_message(tmp_path: Path, body: str,
                                                  said: str) -> None:
    assert error(tmp_path, f"services:\n  web:\n    {body}\n").startswith(said)


def test_a_host_name_with_placeholders_is_taken(tmp_path: Path) -> None:
    """(With a domain: tests/test_hostname_domain.py.)"""
    st = deploy(tmp_path, "services:\n  web: {image: a, hostname: 'web-{{.Task.Slot}}'}\n")
    assert st.services[0].task.container.hostname == "web-{{.Task.Slot}}"


def test_a_variable_not_set_is_warned_once_with_where_it_is_used(tmp_path: Path) -> None:
    """MinIO's four ``image: minio/minio:${RELEASE}`` gave four warnings, Jitsi's CONFIG
    (before its .env is written) ten: one a variable, as docker compose."""
    st = deploy(tmp_path, """
services:
  minio1: {image: "minio/minio:${RELEASE:-a}", command: "${OPTS}"}
  minio2: {image: minio/minio, command: "${OPTS}", environment: ["A=${OPTS}${OPTS}"]}
  nginx: {image: nginx, command: "${NGINX}"}
""")
    assert [w for w in st.warnings if "variable" in w] == [
        "the OPTS variable is not set: it is replaced by an empty string (at "
        "services.minio1.command, services.minio2.command and 2 more)",
        "the NGINX variable is not set: it is replaced by an empty string (at "
        "services.nginx.command)"]


def test_a_key_docker_stack_deploy_refuses_is_not_said_to_be_ignored_by_swarm(
        tmp_path: Path) -> None:
    """Zabbix's ``attach``, Sentry's ``pull_policy``, Compose v2's ``mem_limit``: left out
    with a warning that says docker stack deploy refuses them (and where a limit goes),
    not that "Swarm ignores it too", which holds for links, container_name..."""
    st = deploy(tmp_path, """
services:
  web: {image: nginx, build: ., attach: false, mem_limit: 512m, scale: 2}
""")
    assert sorted(st.warnings) == [
        "attach: ignored: it does not apply to a stack (docker stack deploy refuses the key) "
        "(service web)",
        "mem_limit: ignored: give the limit under deploy.resources (docker stack deploy "
        "refuses the key) (service web)",
        "scale: ignored: give the count as deploy.replicas (docker stack deploy refuses the "
        "key) (service web)"]


def test_tmpfs_flags_shoal_applies_anyway_are_not_warned(tmp_path: Path) -> None:
    """Jitsi's ``/run:size=16M,mode=1750,exec``: shoal's tmpfs mounts are rw, exec, nosuid
    and nodev (shoal.runtime.rootfs), so ``exec`` is honoured and not said to be ignored;
    ``mode`` and ``noexec`` are."""
    st = deploy(tmp_path, """
services:
  web: {image: jitsi/web, tmpfs: ["/run:size=16M,mode=1750,exec,rw,nosuid,nodev",
                                  "/tmp:size=16M,noexec"]}
""")
    assert [m.tmpfs_size for m in st.services[0].task.container.mounts] == [16 << 20] * 2
    assert [w.split(":")[0] for w in st.warnings] == ["tmpfs (mode)", "tmpfs (noexec)"]


def test_an_unknown_short_volume_option_is_warned_and_ignored_as_docker_compose_does(
        tmp_path: Path) -> None:
    """Zabbix's ``snmptraps:/var/lib/zabbix/snmptraps:roz`` (no such option: docker compose
    ignores it and mounts read-write): deployed the same, with a warning naming it."""
    st = deploy(tmp_path, """
services:
  server: {image: zabbix/server:7, volumes: ["snmptraps:/var/lib/zabbix/snmptraps:roz",
                                             "logs:/logs:ro,z"]}
volumes: {snmptraps: {}, logs: {}}
""")
    mounts = st.services[0].task.container.mounts
    assert [(m.source, m.readonly) for m in mounts] == [("app_snmptraps", False),
                                                        ("app_logs", True)]
    assert [w for w in st.warnings if "'roz'" in w and "ignored" in w], st.warnings
