"""The CLI as a Docker user meets it: waiting with progress, exit codes, `-p TARGET`,
`--publish mode=host`, `service update NAME --flag`, `-q`/`--filter`/`--format`/`--no-trunc`,
task-id logs, and what `service ls` imports (the CLI's responsiveness, bench/cli_latency.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Lab, wait_until
from shoal.cli import main as cli_main
from shoal.cli import output, progress
from shoal.cli.errors import CliError
from shoal.cli.flagvalues import parse_publish
from shoal.cli.main import build_parser, parse_since, split_update_command
from shoal.cli.specflags import apply_update_args, spec_from_create_args
from shoal.raft.state import ClusterState

SLEEP = ["--", "sleep", "100000"]
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- no network

# What `shoal service ls|ps|inspect` may import beyond a bare interpreter's start (`python -S`):
# argparse and what it needs (re, gettext → locale), json, the C socket module, and five
# modules of the CLI (main, client, errors, output, and parsers: argparse only) — plus progress
# and registry, whose flags the `service` parsers add (both import nothing but argparse). Not:
# typing, socket (selectors, enum flags), shutil (argparse's terminal width: bz2, lzma),
# urllib.parse, pathlib, http.client, ssl, rich, msgspec, yaml, the spec, raft or node code, or
# another command group's module. A module that joins this set must be worth its milliseconds
# on the path scripts call in loops (bench/cli_latency.py, docs/benchmarks.md).
LIGHT_IMPORTS = frozenset({
    "argparse", "gettext", "locale", "_locale", "json", "json.decoder", "json.encoder",
    "json.scanner", "_json", "_socket", "collections.abc",
    # re and what it imports (argparse's), and what `site` would have imported anyway
    "re", "re._casefix", "re._compiler", "re._constants", "re._parser", "_sre", "copyreg",
    "enum", "functools", "_functools", "operator", "_operator", "types", "reprlib",
    "keyword", "itertools", "collections", "_collections", "_collections_abc", "warnings",
    "contextlib", "os", "os.path", "posixpath", "genericpath", "stat", "_stat", "errno",
    "__future__", "importlib", "importlib._bootstrap", "importlib._bootstrap_external",
    "shoal", "shoal.cli", "shoal.cli.main", "shoal.cli.client", "shoal.cli.errors",
    "shoal.cli.output", "shoal.cli.parsers", "shoal.cli.progress", "shoal.cli.registry",
})


@pytest.mark.parametrize("command", [["service", "ls"], ["service", "ps", "web", "db"],
                                     ["service", "inspect", "web"]])
def test_service_ls_ps_inspect_import_only_light_modules(tmp_path: Path, command: list[str]
                                                          ) -> None:
    """The modules `shoal service ls|ps|inspect` (the commands scripts call in loops) import,
    as a wheel install has them: run in `python -S` (no site-packages, no editable install's
    import hook, which itself imports pathlib, re, urllib.parse…) with the package laid out
    as pyproject's package-dir installs it. Every one must be in LIGHT_IMPORTS."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    (tmp_path / "shoal").mkdir()
    for name, d in dirs.items():
        (tmp_path / name.replace(".", "/")).symlink_to(ROOT / d)
    code = ("import sys\nbase = set(sys.modules)\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "from shoal.cli.main import main\n"
            "try:\n"
            f"    main(['-H', 'unix:///nonexistent/shoal.sock', *{command!r}])\n"
            "except SystemExit:\n    pass\n"
            "print(' '.join(sorted(set(sys.modules) - base)))")
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    mods = set(res.stdout.split())
    assert "shoal.cli.main" in mods and "cannot connect" in res.stderr, res
    assert not mods - LIGHT_IMPORTS, sorted(mods - LIGHT_IMPORTS)
    heavy = {m for m in mods if m.split(".")[0] in ("rich", "msgspec", "yaml", "email",
                                                     "typing", "socket", "shutil", "pathlib")
             or m.startswith(("shoal.raft", "shoal.node", "shoal.cli.compose",
                              "shoal.cli.specflags", "http.client", "ssl", "urllib"))}
    assert not heavy, sorted(heavy)


def test_main_builds_only_the_group_argv_names_and_parses_as_the_whole_parser() -> None:
    """main() builds the parser of the command group argv names (command_group); what it
    parses is what the whole parser parses, and `shoal --help` still lists every group."""
    full = build_parser()
    choices = next(a for a in full._subparsers._group_actions).choices  # type: ignore[union-attr]
    assert set(choices) == {n for names, _ in cli_main._GROUPS for n in names}
    for argv in (["service", "ls", "-q"], ["-H", "unix:///x", "--stale", "service", "ps", "a"],
                 ["--host=unix:///x", "node", "inspect", "n1"], ["-Hunix:///x", "info"],
                 ["secret", "ls"], ["config", "inspect", "c"], ["image", "ls"],
                 ["stack", "ls"], ["network", "ls"], ["volume", "ls"], ["unlock-key", "-q"],
                 ["swarm", "update", "--autolock", "true"], ["user", "ls"],
                 ["join-token", "worker"], ["events", "--since", "1m"]):
        group = cli_main.command_group(argv)
        assert group == next(w for w in argv if not w.startswith("-") and w != "unix:///x")
        only = build_parser(lazy=True, only=group)
        assert list(next(a for a in only._subparsers._group_actions  # type: ignore[union-attr]
                         ).choices) == [n for names, _ in cli_main._GROUPS if group in names
                                        for n in names]
        assert vars(only.parse_args(argv)) == vars(full.parse_args(argv)), argv
    for argv in ([], ["--help"], ["--version"], ["--sta", "service", "ls"], ["servce", "ls"]):
        assert cli_main.command_group(argv) is None  # (then the whole parser is built)
    out = subprocess.run([sys.executable, "-c", "from shoal.cli.main import main; main()",
                          "--help"], capture_output=True, text=True, check=True, timeout=60)
    assert all(n in out.stdout for n in choices), out.stdout
    bad = subprocess.run([sys.executable, "-c", "from shoal.cli.main import main; main()",
                          "servce", "ls"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'servce'" in bad.stderr
    assert "'service'" in bad.stderr and "'volume'" in bad.stderr


def test_publish_target_only_means_an_assigned_port_and_mode_host_needs_one() -> None:
    assert parse_publish("80") == {"published": 0, "target": 80, "protocol": "tcp"}
    assert parse_publish("8080:80/udp") == {"published": 8080, "target": 80, "protocol": "udp"}
    assert parse_publish("target=80,mode=ingress")["published"] == 0
    assert parse_publish("published=8080,target=80,mode=host")["mode"] == "host"
    for bad, why in (("target=80,mode=host", "mode=host needs published=N"),
                     ("target=80,mode=bridge", "mode must be ingress or host"),
                     ("80:x", "expects [[HOST_IP:]PUBLISHED:]TARGET"),
                     ("target=80,foo=1", "'foo'")):
        with pytest.raises(CliError) as exc:
            parse_publish(bad)
        assert "--publish" in str(exc.value) and why in str(exc.value)


def test_the_managers_assign_published_ports_deterministically_and_keep_them() -> None:
    """`-p 80`: the lowest free port of 30000-32767, the same on every manager (it is chosen
    inside the Raft apply); an update that still says 0 keeps the port it had."""
    def spec(name: str, *ports: tuple[int, int]) -> dict[str, Any]:
        return {"name": name, "task": {"container": {"command": ["sleep", "9"]}},
                "endpoint": {"ports": [{"published": p, "target": t} for p, t in ports]}}
    states = [ClusterState(), ClusterState()]
    for st in states:
        assert "ok" in st.apply({"op": "service_create", "id": "a", "now": 1.0,
                                 "spec": spec("a", (0, 80), (30001, 81))})
        assert "ok" in st.apply({"op": "service_create", "id": "b", "now": 1.0,
                                 "spec": spec("b", (0, 80), (0, 443))})
        assert "ok" in st.apply({"op": "service_update", "id": "a", "now": 2.0,
                                 "spec": spec("a", (0, 80), (30001, 81), (0, 82))})
    ports = [[(p.published, p.target) for p in st.services[sid].spec.endpoint.ports]
             for st in states for sid in ("a", "b")]
    assert ports[:2] == ports[2:]  # the same on every replica of the state
    assert ports[0] == [(30000, 80), (30001, 81), (30004, 82)]
    assert ports[1] == [(30002, 80), (30003, 443)]


def test_update_takes_flags_after_the_name_and_the_command_after_a_double_dash() -> None:
    p = build_parser()
    head, cmd = split_update_command(["service", "update", "web", "--replicas", "3", "--",
                                      "sh", "-c", "x"])
    args = p.parse_args(head)
    args.command = cmd
    spec = {"name": "web", "mode": {"replicas": 1}, "task": {"container": {"command": ["a"]}}}
    new = apply_update_args(spec, args)
    assert new["mode"]["replicas"] == 3 and new["task"]["container"]["command"] == \
        ["sh", "-c", "x"]
    args = p.parse_args(["service", "update", "web", "--args", "sleep 5"])
    assert apply_update_args(spec, args)["task"]["container"]["command"] == ["sleep", "5"]
    # a create's `--` is its own (a command word "update" is not an update)
    assert split_update_command(["service", "create", "--name", "update", "--", "x"])[1] is None


def test_secret_add_replaces_by_file_name_and_secret_rm_by_secret() -> None:
    """Docker's rotation idiom keeps every other reference: `--secret-rm pw --secret-add
    source=pw2,target=pw` on a service with pw (at pw) and pw2 (at t2) leaves pw2 at t2 and
    at pw (the add replaced references by secret name: pw2's t2 was dropped silently)."""
    p = build_parser()
    spec = {"name": "w", "task": {"container": {"command": ["a"], "secrets": [
        {"name": "pw", "target": "pw"}, {"name": "pw2", "target": "t2", "mode": 0o400}]}}}
    args = p.parse_args(["service", "update", "w", "--secret-rm", "pw",
                         "--secret-add", "source=pw2,target=pw"])
    refs = apply_update_args(spec, args)["task"]["container"]["secrets"]
    assert sorted((r["name"], r["target"]) for r in refs) == [("pw2", "pw"), ("pw2", "t2")]
    args = p.parse_args(["service", "update", "w", "--config-add", "source=c2,target=app.conf"])
    spec["task"]["container"]["configs"] = [{"name": "c1", "target": "app.conf"}]
    refs = apply_update_args(spec, args)["task"]["container"]["configs"]
    assert [(r["name"], r["target"]) for r in refs] == [("c2", "app.conf")]


def test_since_accepts_unix_seconds_rfc3339_and_go_durations() -> None:
    assert parse_since("1700000000.5") == 1700000000.5
    assert parse_since("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_since("1m30s", now=1000.0) == 910.0
    with pytest.raises(CliError, match="--since"):
        parse_since("yesterday")


TASKS = [
    {"id": "a" * 25, "name": "web.1", "node": "h1", "node_id": "n1" * 12, "slot": 1,
     "desired_state": "running", "state": "running", "state_since": 0, "error": "",
     "message": "", "created_at": 1.0, "service": "web", "service_id": "s" * 25},
    {"id": "b" * 25, "name": "web.2", "node": "h2", "node_id": "n2" * 12, "slot": 2,
     "desired_state": "shutdown", "state": "failed", "state_since": 0,
     "error": "task exited with status 3 " + "x" * 60, "message": "", "created_at": 1.0,
     "service": "web", "service_id": "s" * 25},
]


def test_filters_quiet_templates_and_no_trunc() -> None:
    keep = output.parse_filters(["desired-state=running", "desired-state=accepted"], "task")
    assert [t["name"] for t in TASKS if output.matches(t, keep, "task")] == ["web.1"]
    assert output.render(TASKS, "task", quiet=True) == f"{'a' * 12}\n{'b' * 12}"
    assert output.render(TASKS, "task", quiet=True, no_trunc=True).split() == \
        ["a" * 25, "b" * 25]
    assert output.render(TASKS, "task", "{{.ID}} {{.Name}} {{.DesiredState}}") == \
        f"{'a' * 12} web.1 Running\n{'b' * 12} web.2 Shutdown"
    assert json.loads(output.render(TASKS[:1], "task", "{{json .}}").splitlines()[0])[
        "Node"] == "h1"
    table = output.render(TASKS, "task", "table {{.Name}}\\t{{.Node}}").splitlines()
    assert table[0].split() == ["NAME", "NODE"] and table[2].split() == ["web.2", "h2"]
    cut = output.render(TASKS, "task").splitlines()[2]
    assert "..." in cut and "x" * 60 not in cut
    assert "x" * 60 in output.render(TASKS, "task", no_trunc=True)
    for bad, msg in ((["colour=red"], "invalid filter 'colour'"), (["name"], "KEY=VALUE")):
        with pytest.raises(CliError, match=msg):
            output.parse_filters(bad, "task")
    with pytest.raises(CliError, match="--format"):
        output.render(TASKS, "task", "wide")
    # what docker refuses: a filter value outside its set, a template it cannot evaluate
    with pytest.raises(CliError, match="invalid desired-state 'bogus'"):
        output.parse_filters(["desired-state=bogus"], "task")
    for bad, msg in (("{{.Nope}}", "no field 'Nope'"), ("{{.Name", "cannot evaluate"),
                     ("{{upper .Name}}", "cannot evaluate"), ("{{.Name}} }}", "cannot")):
        with pytest.raises(CliError, match=msg):
            output.render(TASKS, "task", bad)
    assert output.render(TASKS, "task", "{{.Node}}") == "h1\nh2"  # (a record's own field)
    # volumes too (by name, as docker's)
    vols = [{"name": "data", "driver": "local", "scope": "local", "services": ["a"]},
            {"name": "nfs1", "driver": "local", "scope": "global", "services": []}]
    keep = output.parse_filters(["scope=global"], "volume")
    assert [v["name"] for v in vols if output.matches(v, keep, "volume")] == ["nfs1"]
    assert output.render(vols, "volume", quiet=True) == "data\nnfs1"
    assert output.render(vols, "volume", "{{.Name}}:{{.Services}}") == "data:1\nnfs1:0"
    users = [{"name": "alice", "role": "admin", "password": True, "token": False,
              "updated_at": 0}, {"name": "bob", "role": "viewer", "password": True,
                                 "token": True, "updated_at": 0}]
    keep = output.parse_filters(["role=viewer"], "user")
    assert [u["name"] for u in users if output.matches(u, keep, "user")] == ["bob"]
    assert output.render(users, "user", quiet=True) == "alice\nbob"
    assert output.render(users, "user").splitlines()[0].split() == \
        ["NAME", "ROLE", "PASSWORD", "TOKEN", "UPDATED"]


def test_one_line_errors_negative_values_and_port_keys(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """An argparse error is one `Error:` line and where to look (docker's shape), not the
    ~50-line usage of `service create`; `-5M` is a bad value of its flag, not a missing one;
    `--publish-rm abc` is refused."""
    from shoal.cli import specflags

    with pytest.raises(SystemExit):
        build_parser().parse_args(["service", "create", "--mode", "bogus", "x"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Error: argument --mode: invalid choice: 'bogus'")
    assert err[1:] == ["See 'shoal service create --help'."]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["service"])
    assert "required: a command (see --help)" in capsys.readouterr().err
    args = build_parser().parse_args(["service", "create", "--name", "w", "--limit-memory",
                                      "-5M", "--", "x"])
    with pytest.raises(CliError, match=r"^--limit-memory: invalid size '-5M'"):
        specflags.spec_from_create_args(args)
    current = {"name": "w", "task": {"container": {"command": ["x"]}},
               "endpoint": {"ports": [{"published": 8080, "target": 80}]}}
    for flag in ("--publish-rm", "--expose-rm"):
        with pytest.raises(CliError, match=f"^{flag}: expected PORT"):
            apply_update_args(current, build_parser().parse_args(
                ["service", "update", flag, "abc", "w"]))
    new = apply_update_args(current, build_parser().parse_args(
        ["service", "update", "--publish-rm", "8080", "w"]))
    assert new["endpoint"]["ports"] == []


def test_an_ended_task_is_shown_desired_shutdown_as_swarm_shows_it() -> None:
    """A task that failed (or was rejected, exited, lost) while wanted running is shown
    `shutdown`, so `-f desired-state=running` lists live tasks only and a wait that counts
    them ends; a job's completion is `complete`."""
    from shoal.node.views import task_view
    from shoal.raft.models import Service, Task, TaskState, TaskStatus
    from shoal.raft.state import ClusterInfo, Snapshot
    from shoal.raft.validate import validate_spec

    def world(mode: str) -> tuple[Snapshot, Service]:
        spec = validate_spec({"name": "web", "mode": {"type": mode},
                              "task": {"container": {"command": ["x"]}}})
        svc = Service(id="s1", spec=spec)
        return Snapshot(index=1, cluster=ClusterInfo(), nodes={}, services={"s1": svc},
                        tasks={}), svc

    def task(svc: Service, state: TaskState) -> Task:
        return Task(id="t1", service_id="s1", service_name="web", slot=1, spec=svc.spec.task,
                    service_version=1, desired_state=TaskState.RUNNING, node_id="n1",
                    status=TaskStatus(state=state))

    snap, svc = world("replicated")
    shown = {state: task_view(task(svc, state), snap)["desired_state"] for state in (
        TaskState.RUNNING, TaskState.FAILED, TaskState.REJECTED, TaskState.COMPLETE)}
    assert shown == {TaskState.RUNNING: "running", TaskState.FAILED: "shutdown",
                     TaskState.REJECTED: "shutdown", TaskState.COMPLETE: "shutdown"}
    snap, svc = world("replicated-job")
    assert task_view(task(svc, TaskState.COMPLETE), snap)["desired_state"] == "complete"


def test_the_verdict_of_a_wait() -> None:
    svc = {"name": "web", "replicas": 1, "running": 1, "mode": "replicated",
           "update_status": {"state": "completed", "started_at": 5.0}}
    assert progress.verdict(svc, TASKS, "update", None) == ("ok", "Service converged")
    svc["update_status"] = {"state": "updating", "started_at": 6.0}
    assert progress.verdict(svc, TASKS, "update", None) == ("", "")
    svc["update_status"] = {"state": "rollback_completed", "started_at": 6.0,
                            "message": "task failed"}
    assert progress.verdict(svc, TASKS, "update", None)[0] == "fail"
    assert progress.verdict(svc, TASKS, "rollback", None)[0] == "ok"
    # a rolled-back update of before is not this scale's outcome
    assert progress.verdict(svc, TASKS, "update", dict(svc["update_status"]))[0] == "ok"
    assert progress.verdict(svc, TASKS, "scale", None)[0] == "ok"
    svc["update_status"] = {"state": "paused", "message": "task x failed"}
    assert progress.verdict(svc, TASKS, "update", None) == ("fail",
                                                            "update paused: task x failed")
    svc["update_status"] = {"state": "completed", "started_at": 7.0, "message":
                            "update completed (1 of 1 tasks not up: failure action continue)"}
    assert progress.verdict(svc, TASKS, "update", None)[0] == "fail"
    job = {"name": "j", "replicas": 3, "running": 0, "completed": 3, "failed": 1,
           "mode": "replicated-job", "update_status": {}}
    assert progress.verdict(job, [], "create", None) == ("ok", "Job complete")


# ----------------------------------------------------------------------------- one host

@pytest.mark.netns
def test_the_cli_waits_shows_progress_and_scripts_well(lab_factory: Callable[..., Lab]
                                                       ) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    # create waits until every task runs, printing plain progress lines (stdout is a pipe)
    res = h1.cli("service", "create", "--name", "web_1", "--replicas", "2", "-p", "80",
                 "--restart-delay", "0s", *SLEEP, wait=True, timeout=60)
    lines = res.stdout.splitlines()
    assert "\x1b" not in res.stdout, res.stdout
    assert "overall progress: 2 out of 2 tasks" in lines
    assert "1/2: running" in lines and "2/2: running" in lines
    assert lines[-1] == "verify: Service converged"
    svc = h1.cli_json("service", "inspect", "web_1")[0]
    assert lines[0] == svc["id"]
    assert svc["ports"] == [{"published": 30000, "target": 80, "protocol": "tcp"}]
    assert "*:30000->80/tcp" in h1.cli("service", "ls").stdout
    # flags after the name are flags; the assigned port stays across the update
    res = h1.cli("service", "update", "web_1", "--replicas", "3", "--env-add", "A=1",
                 wait=True, timeout=90)
    assert res.stdout.splitlines()[-1] == "verify: Service converged"
    assert h1.cli_json("service", "inspect", "web_1")[0]["ports"][0]["published"] == 30000
    bad = h1.cli("service", "update", "web_1", "sleep", "5", check=False)
    assert bad.returncode != 0 and "--args" in bad.stderr
    bad = h1.cli("service", "create", "-d", "-p", "target=80,mode=host",
                 *SLEEP, check=False)
    assert bad.returncode == 1 and "--publish" in bad.stderr and "mode=host" in bad.stderr
    # -d returns at once; a job waits for its completions
    assert h1.cli("service", "create", "-d", "--name", "idle", "--replicas", "2", *SLEEP
                  ).stdout.count("\n") == 1
    res = h1.cli("service", "create", "--name", "batch", "--mode", "replicated-job",
                 "--replicas", "2", "--", "sh", "-c", "echo done-$$", wait=True, timeout=60)
    assert "job progress: 2 out of 2 complete, 0 failed" in res.stdout
    assert res.stdout.splitlines()[-1] == "verify: Job complete"
    # an update whose tasks fail pauses (the default failure action): non-zero, the reason
    # (2 replicas one at a time: the orchestrator judges a batch while old tasks remain)
    wait_until(lambda: h1.cli_json("service", "ls", "-f", "name=idle")[0]["running"] == 2,
               timeout=30, what="idle running")
    started = time.monotonic()
    res = h1.cli("service", "update", "idle", "--update-parallelism", "1", "--update-delay",
                 "5s", "--",
                 "sh", "-c", "exit 3", check=False, wait=True, timeout=90)
    assert res.returncode == 1, res
    assert "update paused" in res.stderr and time.monotonic() - started < 80
    # scripting: -q, --filter, --format, --no-trunc on the real lists
    ids = h1.cli("service", "ls", "-q").stdout.split()
    assert len(ids) == 3 and all(len(i) == 12 for i in ids)
    assert h1.cli("service", "ls", "-q", "--no-trunc", "--filter", "name=web").stdout.split() \
        == [svc["id"]]
    assert h1.cli("service", "ls", "--filter", "mode=replicated-job", "--format",
                  "{{.Name}}:{{.Mode}}").stdout.split() == ["batch:replicated-job"]
    # (the job's completed tasks are wanted Complete, as Swarm shows them: not "running")
    ps = h1.cli("service", "ps", "web_1", "batch", "-f", "desired-state=running",
                "--format", "{{.Name}}").stdout.split()
    assert sorted(ps) == ["web_1.1", "web_1.2", "web_1.3"]
    ps = h1.cli("service", "ps", "web_1", "batch", "-f", "desired-state=running",
                "-f", "name=web_1.1", "-f", "name=batch", "--format", "{{.Name}}").stdout
    assert ps.split() == ["web_1.1"]
    ps = h1.cli("service", "ps", "web_1", "batch", "-f", "name=batch",
                "--format", "{{.Name}} {{.DesiredState}}").stdout.splitlines()
    assert sorted(ps) == ["batch.1 Complete", "batch.2 Complete"]
    assert h1.cli("node", "ls", "-q", "-f", "role=manager").stdout.split() == \
        [h1.cli_json("node", "ls")[0]["id"][:12]]
    bad = h1.cli("node", "ls", "-f", "colour=red", check=False)
    assert bad.returncode == 1 and "--filter" in bad.stderr
    # the failed tasks of the paused update are shown Shutdown (as Swarm): the next update's
    # wait ends (it waited for good, counting them as wanted running)
    res = h1.cli("service", "update", "idle", "--args", "sleep 100000", wait=True,
                 timeout=90)
    assert res.stdout.splitlines()[-1] == "verify: Service converged", res.stdout
    states = {(t["desired_state"], t["state"]) for t in h1.cli_json("service", "ps", "idle")}
    assert ("shutdown", "failed") in states and ("running", "failed") not in states
    # labels filter the lists (the list records carry them)
    h1.cli("service", "create", "-d", "--name", "la", "--label", "team=a", *SLEEP)
    la = h1.cli_json("service", "inspect", "la")[0]["id"][:12]
    assert h1.cli("service", "ls", "-q", "-f", "label=team=a").stdout.split() == [la]
    assert h1.cli("service", "ls", "-q", "-f", "label=team=b").stdout.split() == []
    me = h1.cli_json("node", "ls")[0]["id"]
    h1.cli("node", "update", "--label-add", "zone=b", me)
    assert h1.cli("node", "ls", "-q", "-f", "label=zone=b").stdout.split() == [me[:12]]
    assert "IMAGE" in h1.cli("service", "ls").stdout.splitlines()[0]
    # an overlay network on the nodes' own subnet is refused naming the node
    lan = h1.ip.rsplit(".", 1)[0] + ".0/24"
    bad = h1.cli("network", "create", "--subnet", lan, "clash", check=False)
    assert bad.returncode == 1 and f"holds node {h1.name}'s address" in bad.stderr, bad
    # --tail: a negative number is all lines (docker's), text a one-line error
    assert h1.cli("service", "logs", "--tail", "-1", "batch").stdout.count("done-") == 2
    bad = h1.cli("service", "logs", "--tail", "abc", "batch", check=False)
    assert bad.returncode == 1 and "--tail: expected a number" in bad.stderr
    # logs of one task by its id, and --since
    task = next(t for t in h1.cli_json("service", "ps", "batch"))
    out = wait_until(lambda: h1.cli("service", "logs", task["id"][:12]).stdout or None,
                     timeout=20, what="the task's log")
    assert out.count("done-") == 1 and task["id"][:12] in out
    assert h1.cli("service", "logs", "--since", "1h", "batch").stdout.count("done-") == 2
    assert h1.cli("service", "logs", "--since", "0s", "batch").stdout.count("done-") == 0


class _Replies:
    """The API as the wait loop sees it: a service that converges after two looks."""

    def __init__(self) -> None:
        self.looks = 0

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if path.endswith("/tasks"):
            state = "running" if self.looks > 2 else "preparing"
            return [{**TASKS[0], "state": state, "message": "pulling image: 12 of 40 MiB"}]
        self.looks += 1
        return {"name": "web", "replicas": 1, "running": int(self.looks > 2),
                "mode": "replicated", "update_status": {}}


def test_progress_on_a_terminal_is_redrawn_in_place_with_rich(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the block is redrawn (rich, control codes); the image pull progress the
    worker reports as the task's message is shown."""
    import os

    monkeypatch.setattr(progress, "POLL", 0.01)
    main_fd, side_fd = os.openpty()
    with os.fdopen(side_fd, "w") as tty:
        progress.wait(_Replies(), "web", "create", build_parser().parse_args(
            ["service", "scale", "web=1"]), out=tty)
    os.set_blocking(main_fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except (BlockingIOError, OSError):  # (EIO: the other side is closed and drained)
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    text = b"".join(chunks).decode()
    assert "\x1b[" in text and "pulling image: 12 of 40 MiB" in text
    assert "verify: Service converged" in text and "overall progress: 1 out of 1 tasks" in text


def test_inspect_prints_what_it_found_as_json_or_a_template_then_fails_for_the_rest(
        capsys: pytest.CaptureFixture[str]) -> None:
    """docker's `inspect`: `--format '{{.Spec.Name}}'` per record (fields as docker spells
    them: `.UpdateStatus` is `update_status`), the records found, then one error (exit 1) for
    a name that is not there."""
    recs = {"web": {"id": "s1", "spec": {"name": "web"}, "update_status": {"state": "completed"}}}

    def fetch(ref: str) -> dict[str, Any]:
        if ref not in recs:
            raise CliError(f"no such service: {ref}")
        return recs[ref]

    output.inspect(fetch, ["web"], "{{.Spec.Name}} {{.UpdateStatus.State}}")
    assert capsys.readouterr().out == "web completed\n"
    output.inspect(fetch, ["web"], "{{json .UpdateStatus}}")
    assert json.loads(capsys.readouterr().out) == {"state": "completed"}
    with pytest.raises(CliError, match="no such service: nosuch"):
        output.inspect(fetch, ["web", "nosuch"], "json")
    assert json.loads(capsys.readouterr().out) == [recs["web"]]
    with pytest.raises(CliError, match="no field 'Nope'"):
        output.inspect(fetch, ["web"], "{{.Nope}}")
    # a field deeper down is checked too (Docker's `.Spec.TaskTemplate` printed null: a
    # script read "no secrets"); a label that is not set is a Go map's <no value>
    recs["web"]["spec"]["labels"] = {"team": "a"}
    with pytest.raises(CliError, match=r"no field 'TaskTemplate' in \.Spec \(fields there: "
                                       "labels, name\\)"):
        output.inspect(fetch, ["web"], "{{json .Spec.TaskTemplate.ContainerSpec}}")
    output.inspect(fetch, ["web"], "{{.Spec.Labels.team}} {{.Spec.Labels.nope}}")
    assert capsys.readouterr().out == "a <no value>\n"


def test_docker_spellings_of_flags_and_the_replicas_column() -> None:
    """What scripts written for `docker service` pass: `--detach=false` (pflag's bool value),
    `--replicas-max-per-node`; and REPLICAS as docker prints it (a script grepping
    "5/5 completed" or reading the first number as "running")."""
    from shoal.cli.main import bool_values
    assert bool_values(["service", "create", "--detach=false", "--quiet=true", "--", "x",
                        "--detach=true"]) == ["service", "create", "--quiet", "--", "x",
                                              "--detach=true"]
    assert bool_values(["service", "create", "--env=true"]) == \
        ["service", "create", "--env=true"]  # (not a bool flag: a value)
    args = build_parser().parse_args(["service", "create", "--name", "m",
                                      "--replicas-max-per-node", "2", "--", "x"])
    assert spec_from_create_args(args)["task"]["placement"]["max_replicas"] == 2
    assert output._replicas({"running": 4, "replicas": 5, "max_replicas_per_node": 1}) == \
        "4/5 (max 1 per node)"
    job = {"running": 2, "replicas": 5, "completed": 1, "failed": 0, "max_concurrent": 2}
    assert output._replicas(job) == "2/2 (1/5 completed)"
    assert output._replicas({**job, "running": 0, "completed": 5}) == "0/0 (5/5 completed)"
    assert output._replicas({**job, "max_concurrent": 0, "running": 3}) == "3/4 (1/5 completed)"


def test_an_update_keeps_the_switches_it_does_not_name() -> None:
    """docker's updateBool: `service update --image X` keeps --tty, --stdin-open and
    --read-only as they are (only --no-healthcheck yields to another health-check flag);
    `--tty=false` changes that one alone."""
    from shoal.raft.models import to_dict
    from shoal.raft.validate import validate_spec

    p = build_parser()
    spec = to_dict(validate_spec(spec_from_create_args(p.parse_args(
        ["service", "create", "--name", "box", "-t", "--stdin-open", "--read-only",
         "--no-healthcheck", "busybox:1", "sh"]))))

    def update(*flags: str) -> Any:
        args = p.parse_args(["service", "update", *flags, "box"])
        return validate_spec(apply_update_args(spec, args)).task.container

    for flags in (["--image", "busybox:2"], ["--oom-score-adj", "5"], ["--user", "nobody"],
                  ["--container-label-add", "a=b"]):
        c = update(*flags)
        assert (c.tty, c.stdin_open, c.read_only) == (True, True, True), flags
    c = update("--tty=false")
    assert (c.tty, c.stdin_open, c.read_only) == (False, True, True)
    c = update("-u", "app", "-w", "/srv")  # (docker's update shorthands, -t too)
    assert (c.user, c.workdir, c.tty) == ("app", "/srv", True)
    assert not update("--health-cmd", "true").healthcheck.disable
    assert update("--image", "busybox:2").healthcheck.disable
