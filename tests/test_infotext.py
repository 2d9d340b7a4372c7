"""`shoal info` for a person (cli/infotext.py): docker info's kind of text from the agent's
record — a manager's, a worker's, a node outside any cluster, a locked one, an older agent's
record without the newer fields — and which output `info` prints (text on a terminal only)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from shoal.cli.infotext import choose, render

MANAGER: dict[str, Any] = {
    "hostname": "h1", "addr": "10.77.0.11", "api_port": 2377, "member": True,
    "version": "0.2.0", "locked": False, "node_id": "9221c9de315e8bae25db",
    "cluster_id": "3096f35b64481ca316d90ece035ad3e9", "role": "manager", "is_leader": True,
    "leader": "10.77.0.11:2378", "ready": True, "term": 1, "voters": ["10.77.0.11:2378"],
    "index": 6,
    "gossip": {"addr": "10.77.0.11:7946", "preset": "lan", "probe_interval": 0.2,
               "confirms_suspicions": True, "health_score": 0,
               "members": {"alive": 2, "suspect": 0, "dead": 0, "left": 0},
               "view": {}, "keys": {"primary": "cf3f9448f8b37820",
                                    "installed": ["cf3f9448f8b37820"]}, "stats": {}},
    "schema": 8, "cluster_schema": 8, "task_history_limit": None,
    "network": {"ready": True, "errors": {"dns": "port 53 in use"}, "services": [],
                "bridge": "shoal0", "subnet": "10.99.0.0/24", "gateway": "10.99.0.1",
                "tasks": {"t1": "10.99.0.2"}, "routes": {"10.99.1.0/24": "10.77.0.12"},
                "overlay": {"networks": {}, "tasks": {}, "errors": {}}, "dns": {}},
}


def test_a_managers_record_reads_as_docker_infos_sections() -> None:
    text = render(MANAGER)
    for line in ("Node:            h1 (9221c9de315e8bae25db)",
                 " Address:        10.77.0.11, API port 2377",
                 " Version:        0.2.0 (state schema 8, cluster at 8)",
                 "Swarm:           active",
                 " Role:           manager (the leader)",
                 " Managers:       1 (10.77.0.11:2378)",
                 " Raft:           term 1, index 6",
                 " Task history:   not set (3 ended tasks a slot)",
                 " Members:        2 alive, 0 suspect, 0 dead, 0 left",
                 "Network:         bridge shoal0, subnet 10.99.0.0/24, gateway 10.99.0.1",
                 " Tasks here:     1",
                 " Error (dns):  port 53 in use"):
        assert line in text.splitlines(), (line, text)


def test_other_states_and_an_older_agents_record_render_too() -> None:
    worker = {**MANAGER, "role": "worker", "is_leader": False, "task_history_limit": 0,
              "removed": "the managers refuse this node", "gossip": None}
    text = render(worker)
    assert " Role:           worker" in text.splitlines() and "leader)" not in text
    assert " State:          index 6 (a copy fed by the managers)" in text and "Raft" not in text
    assert " Task history:   0 ended tasks a slot" in text
    assert "Gossip:          not running" in text
    assert text.splitlines()[-1] == "WARNING: the managers refuse this node"
    outside = render({"hostname": "h9", "addr": "10.0.0.9", "api_port": 2377,
                      "member": False, "version": "0.1.0", "locked": False})
    assert outside.splitlines()[-1] == "Swarm:           inactive" and "Gossip" not in outside
    joining = render({"hostname": "h9", "member": False, "joining": "admitted"})
    assert "Swarm:           joining: admitted" in joining
    locked = render({"hostname": "h9", "member": False, "locked": True})
    assert "locked (`shoal unlock`" in locked
    old = {k: v for k, v in MANAGER.items() if k not in ("schema", "cluster_schema",
                                                          "task_history_limit", "network")}
    assert " Version:        0.2.0" in render(old).splitlines()


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        super().isatty()  # (ValueError once closed)
        return self.tty


def test_text_on_a_terminal_json_for_a_pipe_unless_format_says() -> None:
    assert choose(None, _Stream(True)) == "text"
    assert choose(None, _Stream(False)) == "json"  # (scripts, the Ansible role)
    assert choose("json", _Stream(True)) == "json"
    assert choose("text", _Stream(False)) == "text"
    assert choose("{{.Role}}", _Stream(True)) == "{{.Role}}"
    closed = _Stream(True)
    closed.close()
    assert choose(None, closed) == "json"
    assert choose(None, object()) == "json"


def test_version_shows_the_cli_then_the_agent_or_why_not(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`shoal version` (docker version): the CLI's part always; the agent's from its
    record; an agent that cannot be reached is an error after the client part."""
    from shoal.cli.errors import CliError
    from shoal.cli.infotext import version
    from shoal.node.version import version as own

    class Up:
        def call(self, _method: str, _path: str) -> dict[str, Any]:
            return MANAGER

    class Down:
        def call(self, _method: str, _path: str) -> dict[str, Any]:
            raise CliError("cannot connect to the shoal agent")

    version(Up(), "text")
    out = capsys.readouterr().out
    assert f"Client:\n Version:        {own()}" in out
    assert "Server: the agent on h1\n Version:        0.2.0\n State schema:   8 (the cluster " \
        "writes 8)" in out, out
    version(Up(), "{{.Server.Version}} {{.Client.Version}}")
    assert capsys.readouterr().out == f"0.2.0 {own()}\n"
    with pytest.raises(CliError, match="cannot connect"):
        version(Down(), "text")
    out = capsys.readouterr().out
    assert out.startswith("Client:") and "Server" not in out
