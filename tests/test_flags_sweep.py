"""Every flag of `service create` and `service update`, given a bad value, gets one clear error
naming the flag, through the real CLI against one real agent (issue 12, must-show 7).

The sweep walks the spec's flag declarations (shoal.raft.spec.fields, the same table that makes
the flags in shoal.cli.specflags), so a flag declared later is swept without touching this
file: each parser kind (``cli``: int, float, duration, bytes, choice, map, list by item) has
its bad values here. Only a free-text flag (``cli="str"``) needs a word here: its bad value,
or that any text is valid — a new one fails the sweep until it is classified.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import pytest

from netlab import Host, Lab
from shoal.cli import main as cli_main
from shoal.cli.specflags import PAIRED
from shoal.raft.spec import FieldDecl, fields

pytestmark = pytest.mark.netns

# bad values by parser kind (each must be refused whatever the flag)
BY_KIND: dict[str, list[str]] = {
    "int": ["-1", "x"],
    "float": ["-1", "x"],
    "duration": ["5parsecs"],
    "bytes": ["12zz"],
    "choice": ["bogus"],
    "map": ["=novalue"],  # (an empty key; `--env VAR` alone takes VAR from the shell)
    "struct": ["bogus=1", "min=5,max=2,cpu=50%", "max=3,cpu=150x"],  # (--autoscale)
    "words": ["sh -c 'unclosed", "'' -c"],  # (--entrypoint: a quote, an empty program)
    # (--security-opt: another option, a profile file that is not there, no value, asking
    # for what shoal never does)
    "seccomp": ["apparmor=unconfined", "seccomp=/nonexistent/profile.json", "seccomp=",
                "no-new-privileges=false"],
}
# bad values of list items by item parser
BY_ITEM: dict[str, list[str]] = {
    "mount": ["type=bogus,dst=/x", "src=/tmp", "dst=/x,volume-nocopy=maybe",
              "type=tmpfs,dst=/x,volume-nocopy"],
    "port": ["abc", "80:81/sctp", "70000:80", "2377:80"],
    "expose": ["x", "80/sctp"],
    "secret": ["s,bogus=1", "s,mode=999"],
    "config": ["c,bogus=1"],
    "constraint": ["node.bogus==1", "node.labels.zone"],
    "preference": ["pack=node.labels.x", "spread=zone"],
    "network": ["Bad Name!"],
    "cap": ["FLY", "CAP_"],
    "group": ["bad group!"],
    "host": ["db", "db:999.1.1.1", "bad_name:10.0.0.1"],
    "ulimit": ["nofile=x", "files=1", "nofile=9:1", "nofile", "nofile=1024:", "nofile= 10"],
    "nameserver": ["dns.example", "10.0.0.256"],
    "domain": ["bad domain", "-corp.example"],
    "resolv_option": ["ndots:2;x", "a b"],
}
# free-text flags: their bad values (with what else the create needs to reach the check),
# or None when any text is valid
BY_FLAG: dict[str, tuple[list[str], list[str]] | None] = {
    "--name": (["Bad Name"], []),
    "--image": (["UPPER/Case!"], []),
    "--workdir": (["relative/dir"], []),
    "--user": (["bad user!"], []),
    "--hostname": (["bad_host!"], []),
    "--stop-signal": (["SIGBOGUS", "SIGRTMIN+99", "0"], []),
    "--health-cmd": None,
    "--health-http": (["nope", ":99999/x"], []),
    "--schedule": (["61 * * * *", "* * *"], ["--mode", "replicated-job"]),
    "--schedule-tz": (["Mars/Olympus"], ["--mode", "replicated-job", "--schedule", "@daily"]),
    "--log-driver": (["syslog"], []),
}
# numbers whose range is not the kind's (-1 is a valid --oom-score-adj)
BY_RANGE: dict[str, list[str]] = {"--oom-score-adj": ["-1001", "1001", "x"]}
# flags whose value's check needs more of the spec than the defaults
CONTEXT: dict[str, list[str]] = {
    "--schedule-policy": ["--mode", "replicated-job", "--schedule", "@daily"],
    "--schedule-history": ["--mode", "replicated-job", "--schedule", "@daily"],
}


def cases() -> list[tuple[FieldDecl, str, list[str]]]:
    """(declaration, bad value, context flags) for every declared flag; fails on a flag whose
    kind has no bad value here."""
    out: list[tuple[FieldDecl, str, list[str]]] = []
    unknown: list[str] = []
    for d in fields():
        if not d.flag or d.cli == "flag":  # (a switch takes no value: nothing to get wrong)
            continue
        context = CONTEXT.get(d.flag, [])
        if d.cli == "str":
            if d.flag not in BY_FLAG:
                unknown.append(f"{d.flag} (free text: add its bad value to BY_FLAG)")
                continue
            entry = BY_FLAG[d.flag]
            if entry is None:
                continue
            values, context = entry
        elif d.flag in BY_RANGE:
            values = BY_RANGE[d.flag]
        elif d.cli == "list":
            values = BY_ITEM.get(d.item, [])
        else:
            values = BY_KIND.get(d.cli, [])
        if not values:
            unknown.append(f"{d.flag} (kind {d.cli} {d.item}: add its bad values)")
        out += [(d, v, context) for v in values]
    assert not unknown, "flags without a bad value in the sweep: " + ", ".join(unknown)
    return out


def check_one_error(code: int, out: str, flags: tuple[str, ...], what: str) -> None:
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code != 0, f"{what}: accepted ({out.strip()[-300:]})"
    assert "Traceback" not in out, f"{what}: traceback\n{out}"
    assert len(errors) == 1, f"{what}: expected one error line, got\n{out}"
    assert any(f in errors[0] for f in flags), f"{what}: the error names no {flags[0]}: " \
        f"{errors[0]}"


def cli(host: Host, *args: str) -> tuple[int, str]:
    """``shoal -H unix://SOCK ARGS`` run in this process (the CLI's own ``main``: its parser,
    flag parsers and HTTP client, against the agent's socket), as (exit status, output). An
    exception other than the CLI's exit fails the test here, traceback included. In-process
    because a sweep of ~240 commands would cost ~0.3 s of interpreter start each (and the
    test builds the parser once: see the test); a few go through the installed ``shoal``
    program too."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main.main(["-H", f"unix://{host.sock}", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue() + err.getvalue()


def create_args(d: FieldDecl, value: str, context: list[str], n: int) -> list[str]:
    name = [] if d.flag == "--name" else ["--name", f"bad{n}"]
    return ["service", "create", *name, *context, f"{d.flag}={value}", "--", "sleep", "1"]


def update_args(d: FieldDecl, value: str) -> tuple[str, list[str]]:
    flag = d.flag + "-add" if d.cli in ("list", "map") and d.path not in PAIRED else d.flag
    context = ["--mode", "replicated-job", "--schedule", "@daily"] \
        if d.flag == "--schedule-tz" else []
    return flag, ["service", "update", *context, f"{flag}={value}", "sweep"]


def test_every_create_and_update_flag_refuses_a_bad_value_naming_the_flag(
        lab_factory: Callable[..., Lab], monkeypatch: pytest.MonkeyPatch) -> None:
    """For each declared flag and each bad value of its kind: `service create` and `service
    update` exit non-zero with exactly one error line that names the flag (or its -add form),
    and no traceback — in the CLI's output or in the agent's log."""
    # (argparse parsers are reusable; building one costs ~75 ms)
    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda lazy=False, only=None: parser)
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    h1.cli("service", "create", "--name", "sweep", "--", "sleep", "100000")
    todo = cases()
    assert len({d.flag for d, _, _ in todo}) >= 40  # (the sweep really walks the table)
    for n, (d, value, context) in enumerate(todo):
        code, out = cli(h1, *create_args(d, value, context, n))
        check_one_error(code, out, (d.flag,), f"create {d.flag}={value!r}")
        if d.path != "name":
            flag, args = update_args(d, value)
            code, out = cli(h1, *args)
            check_one_error(code, out, (flag, d.flag), f"update {flag}={value!r}")
    # the installed program, once per kind of check (the CLI's, argparse's, the agent's)
    for d, value, context in [c for c in todo if (c[0].flag, c[1]) in (
            ("--replicas", "x"), ("--mode", "bogus"), ("--replicas", "-1"),
            ("--schedule", "61 * * * *"))]:
        res = h1.cli(*create_args(d, value, context, 0), check=False, timeout=60)
        check_one_error(res.returncode, res.stdout + res.stderr, (d.flag,),
                        f"shoal create {d.flag}={value!r}")
    names = [s["name"] for s in h1.cli_json("service", "ls")]
    assert names == ["sweep"]  # nothing was created by a bad value
    assert "Traceback" not in h1.agent_log.read_text(errors="replace")
