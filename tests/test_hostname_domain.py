"""A task's host name with a domain (Docker's ``--hostname mail.example.com``, Compose's
``hostname:``; cluster schema 14) as pure code: the spec's rule (RFC 1123, at most 64 bytes,
the field named when broken), the schema-14 gate (refused while an older node is in, on
propose and by the state machine; the schema-13 release's own state machine refuses it), the
CLI, Compose and the task's /etc/hosts. The kernel's side (the name set whole, /etc/hosts in a
real container): tests/test_runtime_container.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gates import assert_waits_for, old_release_results
from test_cli_ports_envfile import create
from test_compose_real import deploy
from test_mixed_state_bytes import SCHEMA_13

from shoal.raft.errors import ValidationError
from shoal.raft.models import to_dict
from shoal.raft.schema import HOSTNAME_DOMAIN, SCHEMA
from shoal.raft.validate import validate_spec
from shoal.runtime.rootfs import hosts_file


def _spec(hostname: str) -> dict[str, Any]:
    return {"name": "mail", "task": {"container": {"command": ["x"], "hostname": hostname}}}


def test_a_host_name_may_have_a_domain_and_a_bad_one_names_the_field() -> None:
    for good in ("mail.example.com", "a.b", "x" * 64, "mail-1.example-2.com", "MAIL.Example"):
        assert validate_spec(_spec(good)).task.container.hostname == good
    for bad in ("mail..example", ".mail", "mail.", "-mail.example", "mail.-x", "a_b.c",
                "a.b c", "x" * 60 + ".com1", "mail.exa$mple"):
        with pytest.raises(ValidationError) as exc:
            validate_spec(_spec(bad))
        assert exc.value.field == "task.container.hostname", bad


def test_a_host_name_with_a_domain_waits_for_schema_14() -> None:
    """A schema-13 replica's spec took one DNS label of at most 63 bytes: while one is in,
    a dotted (or 64-byte) name is refused naming the field (create and update, by the
    proposer and by the state machine); one label and placeholders are not gated."""
    assert SCHEMA == HOSTNAME_DOMAIN == 14
    plain = to_dict(validate_spec(_spec("mail")))
    for name in ("mail.example.com", "x" * 64):
        assert_waits_for(14, to_dict(validate_spec(_spec(name))), plain,
                         "task.container.hostname")


def test_the_schema_13_release_refuses_a_host_name_with_a_domain_so_the_gate_is_needed(
        ) -> None:
    results = old_release_results(SCHEMA_13, 13, [_spec("mail.example.com"), _spec("mail"),
                                                  _spec("{{.Node.Hostname}}.mail")])
    assert results[1]["error"]["field"] == "task.container.hostname", results[1]
    assert results[2].get("ok") and results[3].get("ok")


def test_the_cli_takes_it() -> None:
    assert create("--hostname", "mail.example.com", "alpine").task.container.hostname == \
        "mail.example.com"


def test_compose_takes_a_host_name_with_a_domain(tmp_path: Path) -> None:
    """docker-mailserver's ``hostname: mail.example.com`` (was refused before schema 14)."""
    st = deploy(tmp_path, "services:\n  web: {image: mailserver/dms, "
                          "hostname: mail.example.com}\n")
    assert st.services[0].task.container.hostname == "mail.example.com"


def test_etc_hosts_names_the_bare_host_name_beside_the_whole_one() -> None:
    assert "10.0.0.5\tmail.example.com mail\n" in hosts_file("mail.example.com", addr="10.0.0.5")
    assert "127.0.1.1\tdb-3\n" in hosts_file("db-3")


def test_compose_domainname_is_joined_onto_the_host_name(tmp_path: Path) -> None:
    st = deploy(tmp_path, "services:\n  mail: {image: a, hostname: mx, domainname: example.com}\n"
                          "  web_app: {image: a, domainname: example.com.}\n")
    names = {s.name: s.task.container.hostname for s in st.services}
    assert names == {"app_mail": "mx.example.com",
                     "app_web_app": "web-app-{{.Task.Slot}}.example.com"}, names
