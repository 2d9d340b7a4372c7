"""Port ranges (`--publish`, `--publish-add/-rm`, Compose `ports:`) and `service create
--env-file`, as a Docker Swarm user writes them: parsed by the real CLI parser and checked
through the spec's own validation, without a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal.cli import flagvalues, specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.raft.errors import ValidationError
from shoal.raft.models import to_dict
from shoal.raft.spec import ServiceSpec
from shoal.raft.validate import validate_spec


def create(*argv: str) -> ServiceSpec:
    args = build_parser().parse_args(["service", "create", "--name", "web", *argv, "nginx"])
    return validate_spec(specflags.spec_from_create_args(args))


def update(spec: ServiceSpec, *argv: str) -> ServiceSpec:
    args = build_parser().parse_args(["service", "update", *argv, "web"])
    return validate_spec(specflags.apply_update_args(to_dict(spec), args))


def ports(spec: ServiceSpec) -> list[tuple[int, int, str]]:
    return [(p.published, p.target, p.protocol) for p in spec.endpoint.ports]


def stack_ports(tmp_path: Path, items: str) -> list[tuple[int, int, str]]:
    f = tmp_path / "compose.yml"
    f.write_text(f"services:\n  web:\n    image: nginx\n    ports: {items}\n")
    return ports(load_stack("app", [f], {}).services[0])


# ----------------------------------------------------------------------------- --publish

def test_a_publish_range_is_one_port_spec_per_port_paired_as_dockers() -> None:
    """Ranges of one length pair port by port; a published range with one target forwards
    every port to it (docker's swarm PortConfigs); a target range alone is assigned."""
    spec = create("-p", "8000-8010:9000-9010", "-p", "53-54:53-54/udp",
                  "--publish", "published=7000-7001,target=7100-7101,protocol=udp",
                  "-p", "6000-6002:80", "-p", "90-91")
    assert ports(spec) == [(8000 + i, 9000 + i, "tcp") for i in range(11)] + [
        (53, 53, "udp"), (54, 54, "udp"), (7000, 7100, "udp"), (7001, 7101, "udp"),
        (6000, 80, "tcp"), (6001, 80, "tcp"), (6002, 80, "tcp"), (0, 90, "tcp"), (0, 91, "tcp")]
    # (a single port keeps its one-port form)
    assert flagvalues.parse_publish("8080:80/udp") == {"published": 8080, "target": 80,
                                                      "protocol": "udp"}


@pytest.mark.parametrize(("value", "why"), [
    ("8000-8010:9000-9005", "11 published ports for 6 targets"),
    ("10-5:80", "the range '10-5' is reversed"),
    ("80:20-10", "the range '20-10' is reversed"),
    ("1-65535:1-65535", "has 65535 ports: a service publishes at most 256"),
    ("published=9000-9300,target=80", "has 301 ports"),
    ("0-3:80", "'0-3' is out of range (ports are 1-65535)"),
    ("70000:80", "'70000' is out of range"),
    ("8000-:80", "expects [[HOST_IP:]PUBLISHED:]TARGET[/tcp|udp] or published=N,target=N"
                 "[,protocol=tcp|udp][,mode=ingress|host][,host_ip=IP] (a port or a range "
                 "FIRST-LAST each)"),
])
def test_a_bad_publish_range_is_refused_naming_the_flag(value: str, why: str) -> None:
    with pytest.raises(CliError) as exc:
        create("-p", value)
    assert str(exc.value).startswith("--publish") and why in str(exc.value)


def test_a_range_over_a_reserved_port_is_refused_by_the_spec_naming_publish() -> None:
    with pytest.raises(ValidationError) as exc:
        create("-p", "2370-2380:80")
    assert exc.value.field == "endpoint.ports[7].published" and "2377" in str(exc.value)
    assert specflags.flag_of_field(exc.value.field) == "--publish"


def test_update_adds_and_removes_ranges() -> None:
    spec = create("-p", "8080:80")
    spec = update(spec, "--publish-add", "8000-8002:9000-9002", "--publish-add", "53-54/udp",
                  "--publish-add", "81-83")
    assert ports(spec) == [(8080, 80, "tcp"), (8000, 9000, "tcp"), (8001, 9001, "tcp"),
                           (8002, 9002, "tcp"), (0, 53, "udp"), (0, 54, "udp"),
                           (0, 81, "tcp"), (0, 82, "tcp"), (0, 83, "tcp")]
    spec = update(spec, "--publish-rm", "8000-8001", "--publish-rm", "8080-8081/udp")
    assert ports(spec)[:2] == [(8080, 80, "tcp"), (8002, 9002, "tcp")]
    for value, why in (("10-5", "reversed"), ("abc", "expected PORT"), ("1-999", "999 ports")):
        with pytest.raises(CliError) as exc:
            update(spec, "--publish-rm", value)
        assert str(exc.value).startswith("--publish-rm") and why in str(exc.value)
    with pytest.raises(CliError, match=r"^--publish-add '9-8:80': the range '9-8' is rev"):
        update(spec, "--publish-add", "9-8:80")


# ----------------------------------------------------------------------------- compose

def test_compose_port_ranges_in_both_syntaxes(tmp_path: Path) -> None:
    assert stack_ports(tmp_path, '["8000-8002:9000-9002", "9090-9091:8080-8081/udp", '
                       '"7000-7001:80", "3000-3001"]') == [
        (8000, 9000, "tcp"), (8001, 9001, "tcp"), (8002, 9002, "tcp"), (9090, 8080, "udp"),
        (9091, 8081, "udp"), (7000, 80, "tcp"), (7001, 80, "tcp"), (0, 3000, "tcp"),
        (0, 3001, "tcp")]
    # long syntax: `published` a string that may be a range, `target` one port
    assert stack_ports(tmp_path, '[{target: 9000, published: "8000-8002"}, '
                       '{target: 53, published: "5353", protocol: udp}]') == [
        (8000, 9000, "tcp"), (8001, 9000, "tcp"), (8002, 9000, "tcp"), (5353, 53, "udp")]


@pytest.mark.parametrize(("items", "why"), [
    ('["8000-8010:9000-9005"]', "ports[0]: 11 published ports for 6 targets"),
    ('["10-5:80"]', "ports[0]: the range '10-5' is reversed"),
    ('["1-2000:1-2000"]', "ports[0]: the range '1-2000' has 2000 ports"),
    ('["-10:80"]', "ports[0]: '-10' is not a port or a range"),
    ('[{target: 80, published: "10-5"}]', "ports[0].published: the range '10-5' is reversed"),
    ('[{target: 80, published: "a-b"}]', "ports[0].published: 'a-b' is not a port"),
    ('[{target: 70000, published: 80}]', "ports[0].target: invalid port or range"),
    ('["2370-2380:80"]', "ports[7].published: port 2377 is used by shoal"),
])
def test_compose_bad_port_ranges_name_the_key(tmp_path: Path, items: str, why: str) -> None:
    with pytest.raises(ComposeError) as exc:
        stack_ports(tmp_path, items)
    assert str(exc.value).startswith("services.web.") and why in str(exc.value)


# ----------------------------------------------------------------------------- --env-file

def env_of(*argv: str) -> dict[str, Any]:
    return dict(create(*argv).task.container.env)


def test_env_file_reads_dockers_format_and_flags_win(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Values taken as they are (quotes kept, as docker's --env-file keeps them), a bare KEY
    from the shell (left out when unset), comments and blank lines skipped; later files and
    then -e win."""
    monkeypatch.setenv("FROM_SHELL", "shell value")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    one = tmp_path / "one.env"
    one.write_text('\ufeff# a comment\n\nQUOTED="a b"\nSINGLE=\'x\'\n   LEAD=kept  \n'
                   "FROM_SHELL\nNOT_SET_ANYWHERE\nEMPTY=\nSHARED=one\nURL=a=b#c\n")
    two = tmp_path / "two.env"
    two.write_text("SHARED=two\r\nFLAG=file\r\n")
    env = env_of("--env-file", str(one), "-e", "FLAG=flag", "--env-file", str(two))
    assert env == {"QUOTED": '"a b"', "SINGLE": "'x'", "LEAD": "kept  ",
                   "FROM_SHELL": "shell value", "EMPTY": "", "SHARED": "two", "URL": "a=b#c",
                   "FLAG": "flag"}


def test_env_file_errors_name_the_flag_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\nMY VAR=secret\n")
    with pytest.raises(CliError) as exc:
        env_of("--env-file", str(bad))
    assert str(exc.value).startswith(f"--env-file {bad}:2: 'MY VAR' is not a variable name")
    assert "secret" not in str(exc.value)  # (a value is never echoed)
    nameless = tmp_path / "nameless.env"
    nameless.write_text("# x\n=value\n")
    with pytest.raises(CliError, match=r"^--env-file .*nameless.env:2: '' is not a variable"):
        env_of("--env-file", str(nameless))
    with pytest.raises(CliError, match=r"^--env-file .*missing.env: cannot read it: No such"):
        env_of("--env-file", str(tmp_path / "missing.env"))
    binary = tmp_path / "latin1.env"
    binary.write_bytes(b"A=1\nB=caf\xe9\n")
    with pytest.raises(CliError, match=r"^--env-file .*latin1.env:2: not UTF-8 text"):
        env_of("--env-file", str(binary))


def test_publish_add_of_a_target_the_managers_gave_a_port_adds_it_once() -> None:
    """`-p 80-82` then `--publish-add 81-83`: 81 and 82 keep the ports they were given
    (the spec holds them: 30001, 30002), 83 is added (docker's add is idempotent: its spec
    keeps published 0)."""
    p = build_parser()
    spec = validate_spec(specflags.spec_from_create_args(p.parse_args(
        ["service", "create", "--name", "web", "-p", "80-82", "--", "sleep", "9"])))
    given = to_dict(spec)
    for n, port in enumerate(given["endpoint"]["ports"]):
        port["published"] = 30000 + n  # (as the state machine assigns them)
    args = p.parse_args(["service", "update", "--publish-add", "81-83", "web"])
    ports = validate_spec(specflags.apply_update_args(given, args)).endpoint.ports
    assert [(x.published, x.target) for x in ports] == [(30000, 80), (30001, 81),
                                                         (30002, 82), (0, 83)]
