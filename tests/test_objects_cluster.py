"""Secrets, configs and nodes as a Docker Swarm user drives them, through the CLI on a real
agent (a one-host netns lab): removing several at once, sizes, what a rollback still needs,
node labels and `self`. Found by a review against docker's secret/config/node commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from netlab import Host, Lab

pytestmark = pytest.mark.netns


def error_line(host: Host, *args: str) -> str:
    res = host.cli(*args, check=False)
    assert res.returncode == 1, (args, res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip()


def names(host: Host, kind: str) -> set[str]:
    return {o["name"] for o in host.cli_json(kind, "ls")}


def test_secrets_configs_and_node_labels_as_docker_has_them(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    files = {"small": b"s3cret", "empty": b"", "big": b"x" * (800 << 10), "huge": b"y" * (2 << 20)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        # (the lab's hosts see the test's files: same mount namespace)
    for name in ("s1", "s2", "s3", "inuse"):
        h1.cli("secret", "create", name, str(tmp_path / "small"))

    # sizes: refused before the upload with one clear line (800 KiB was "Request Entity Too
    # Large", 2 MiB "Broken pipe"), and an empty value is refused as Swarm does
    for name in ("empty", "big", "huge"):
        for kind in ("secret", "config"):
            err = error_line(h1, kind, "create", f"k{name}", str(tmp_path / name))
            assert f"a {kind} holds 1 byte to 500 KiB" in err, err
    assert not names(h1, "secret") & {"kempty", "kbig", "khuge"}

    # rm of several: one in use does not stop the others (all were kept before)
    h1.cli("service", "create", "-d", "--name", "app", "--secret", "inuse", "--", "sleep", "1000")
    err = error_line(h1, "secret", "rm", "inuse", "s1", "nope", "s2")
    assert "inuse is in use by service(s) app" in err and "no such secret: nope" in err, err
    assert names(h1, "secret") == {"inuse", "s3"}

    # a secret the service's previous spec uses is still needed: `service rollback` would
    # deploy tasks that cannot start
    h1.cli("service", "update", "-d", "--secret-rm", "inuse", "--secret-add", "s3", "app")
    err = error_line(h1, "secret", "rm", "inuse")
    assert "previous spec of service(s) app" in err, err
    h1.cli("service", "update", "-d", "--env-add", "X=1", "app")  # (the previous spec moves on)
    h1.cli("secret", "rm", "inuse")

    # node labels: a key alone is an empty value (docker's `--label-add ssd`); removing a
    # label that is not there is an error, not a silent no-op; `self` is this node
    h1.cli("node", "update", "--label-add", "zone=a", "--label-add", "ssd", "self")
    (me,) = h1.cli_json("node", "inspect", "self")
    assert me["labels"] == {"zone": "a", "ssd": ""}, me["labels"]
    assert "has no label 'nope'" in error_line(h1, "node", "update", "--label-rm", "nope", "h1")
    assert h1.cli_json("node", "inspect", "self")[0]["labels"] == {"zone": "a", "ssd": ""}
    # what docker's inspect and ps show besides: the node's resources, the task's image
    res = me["resources"]
    assert res["memory_bytes"] > 0 and res["cpus"] > 0 and res["reserved_cpus"] == 0, res
    assert h1.cli("service", "ps", "--format", "{{.Name}} {{.Image}}", "app").stdout.split() \
        [:2] == ["app.1", "-"]


def test_service_flags_docker_refuses(lab_factory: Callable[..., Lab]) -> None:
    """`service update --rollback` with other flags dropped them silently (exit 0); max
    replicas per node on a global service was taken and never applied; `scale` of several
    went no further than the first error."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    h1.cli("service", "create", "-d", "--name", "app", "--", "sleep", "1000")
    h1.cli("service", "update", "-d", "--env-add", "A=1", "app")
    err = error_line(h1, "service", "update", "-d", "--rollback", "--env-add", "X=1", "app")
    assert "may not be combined with --rollback" in err, err
    assert h1.cli_json("service", "inspect", "app")[0]["spec"]["task"]["container"]["env"] \
        == {"A": "1"}
    err = error_line(h1, "service", "create", "-d", "--name", "g", "--mode", "global",
                     "--replicas-max-per-node", "1", "--", "sleep", "1000")
    assert "replicated modes only" in err, err
    h1.cli("service", "create", "-d", "--name", "g", "--mode", "global", "--", "sleep", "1")
    h1.cli("service", "create", "-d", "--name", "b", "--replicas", "0", "--", "sleep", "1000")
    err = error_line(h1, "service", "scale", "-d", "app=2", "g=3", "nosuch=1", "b=2")
    assert "global" in err and "no such service: nosuch" in err, err
    replicas = {s["name"]: s["replicas"] for s in h1.cli_json("service", "ls")}
    assert replicas["app"] == 2 and replicas["b"] == 2, replicas
    h1.cli("service", "update", "-d", "--rollback", "app")  # (-d alone: fine)


def test_waiting_for_a_job_whose_tasks_gave_up_ends_in_an_error(
        lab_factory: Callable[..., Lab]) -> None:
    """A job whose unfinished slots used up their restart attempts will never complete: the
    waiting `service create` waited for good ("0 out of 2 complete, 4 failed"); it fails now,
    saying so."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    res = h1.cli("service", "create", "--name", "jf", "--mode", "replicated-job", "--replicas",
                 "2", "--restart-max-attempts", "1", "--restart-delay", "0.2s", "--", "sh",
                 "-c", "exit 3", check=False, timeout=90, wait=True)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "job failed: 2 task(s) failed and will not be retried" in res.stderr, res.stderr
    (view,) = h1.cli_json("service", "inspect", "jf")
    assert view["job_state"] == "failed" and view["failed"] == 4, view
