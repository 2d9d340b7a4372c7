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
def test_extends_is_refused_naming_the_service_not_deployed_without_what_it_extends(
        tmp_path: Path, extends: str) -> None:
    """Zabbix's files take most of each service (env files, volumes, networks) from
    ``extends``: leaving it out deployed a different service; docker stack deploy refuses
    the key too ("Support for `extends` is not implemented yet")."""
    msg = error(tmp_path, f"""
services:
  base: {{image: zabbix/server:7, env_file: [], read_only: true}}
  server:
    image: zabbix/server:7
    extends: {extends}
""")
    assert msg.startswith("services.server.extends: not supported"), msg
    assert "docker stack deploy refuses it too" in msg and "docker compose config" in msg
