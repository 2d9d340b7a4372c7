"""shoal.runtime: a task's terminal (Docker's --tty), its stdin held open (OpenStdin) and its
OOM score adjustment (--oom-score-adj), in real tasks.

A tty task's stdin, stdout and stderr are one pseudo-terminal of the task's own devpts (the
launcher's console, as runc's); what it prints reaches the stdout log, a line's "\\r\\n" as
"\\n". Real tasks need root (namespaces, cgroups). Fixtures: tests/test_runtime_support.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_runtime_support import needs_root, output, run_to_end, task, wait_for_output

from shoal.runtime.errors import InvalidTaskConfig, LaunchFailed
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState, TaskConfig

pytest_plugins = ("test_runtime_support",)  # its fixtures


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


async def _still_running(ctl: ProcessController, task_id: str, seconds: float) -> bool:
    await asyncio.sleep(seconds)
    st = ctl.status(task_id)
    return st is not None and st.state is RunState.RUNNING


@pytest.mark.parametrize(("name", "value", "message"), [
    ("tty", 1, "must be true or false"), ("stdin_open", "yes", "must be true or false"),
    ("oom_score_adj", 1001, "from -1000 to 1000"), ("oom_score_adj", True, "from -1000"),
])  # fmt: skip
def test_a_bad_terminal_or_oom_setting_is_refused_naming_the_field(
        name: str, value: object, message: str) -> None:
    with pytest.raises(InvalidTaskConfig, match=message) as info:
        task("bad", "true", **{name: value}).validate()
    assert info.value.field == name


def test_the_settings_survive_the_stored_config() -> None:
    cfg = task("keep", "true", tty=True, stdin_open=True, oom_score_adj=-17)
    back = TaskConfig.from_json(cfg.to_json())
    assert (back.tty, back.stdin_open, back.oom_score_adj) == (True, True, -17)


@needs_root
async def test_a_tty_task_writes_to_a_terminal_of_its_own_that_the_stdout_log_keeps(
        ctl: ProcessController) -> None:
    """stdin, stdout and stderr are one terminal, in the task's own devpts (ttyname finds
    it there), which is the controlling terminal (/dev/tty opens); stderr's lines reach the
    stdout log too, each without the terminal's carriage return."""
    script = ("test -t 0 && test -t 1 && test -t 2 && echo all-three; tty; "
              ": < /dev/tty && echo controlling; echo to-stderr >&2; "
              "echo via-console > /dev/console")
    st, out, err = await run_to_end(ctl, task("tty1", "sh", "-c", script, tty=True))
    assert st.exit_code == 0, (out, err)
    assert out.splitlines() == ["all-three", "/dev/pts/0", "controlling", "to-stderr",
                                "via-console"]
    assert err == "" and "\r" not in out


@needs_root
async def test_without_a_tty_the_task_has_pipes_and_no_terminal(
        ctl: ProcessController) -> None:
    _, out, err = await run_to_end(ctl, task(
        "notty", "sh", "-c", "test -t 1 || echo no-terminal; tty; echo to-stderr >&2"))
    assert out.splitlines() == ["no-terminal", "not a tty"]
    assert err == "to-stderr\n"


@needs_root
async def test_a_tty_tasks_output_is_all_in_the_log_after_it_exits(
        ctl: ProcessController) -> None:
    """What the command wrote just before exiting is read from the master before its
    end-of-file (EIO once the last process holding the terminal is gone)."""
    st, out, _ = await run_to_end(ctl, task("tty2", "seq", "1", "5000", tty=True))
    assert st.exit_code == 0
    assert out.splitlines() == [str(i) for i in range(1, 5001)]


@needs_root
async def test_a_shell_with_a_tty_or_an_open_stdin_waits_instead_of_exiting(
        ctl: ProcessController) -> None:
    """Compose's `tty: true` / `stdin_open: true` idiom: a shell or `cat` as the command
    keeps the task up (nothing ever writes to its stdin); without either its stdin is
    /dev/null and it ends at once."""
    st, _, _ = await run_to_end(ctl, task("eof", "cat"))
    assert st.exit_code == 0
    await ctl.start(task("shtty", "sh", tty=True))
    await ctl.start(task("catin", "cat", stdin_open=True))
    await ctl.start(task("readin", "sh", "-c", "read line; echo got=$line", stdin_open=True))
    assert await _still_running(ctl, "shtty", 1.0)
    for task_id in ("catin", "readin"):
        st2 = ctl.status(task_id)
        assert st2 is not None and st2.state is RunState.RUNNING, task_id
    assert "got=" not in output(ctl, "readin")
    for task_id in ("shtty", "catin", "readin"):
        st3 = await ctl.stop(task_id, grace=2.0)
        assert st3.state is RunState.EXITED, task_id


@needs_root
async def test_a_non_root_tasks_terminal_is_its_own(ctl: ProcessController) -> None:
    """As runc's console: the terminal belongs to the task's user, who can reopen it."""
    st, out, err = await run_to_end(ctl, task(
        "ttyusr", "sh", "-c", "stat -c %u $(tty); echo hi > $(tty) && echo reopened",
        user="nobody", tty=True))  # fmt: skip
    assert st.exit_code == 0, (out, err)
    assert out.splitlines() == ["65534", "hi", "reopened"]


@needs_root
async def test_the_oom_score_adjustment_reaches_the_command(ctl: ProcessController) -> None:
    """Raised for tini and the command (any process may); lowered below 0 only by a node
    whose agent has CAP_SYS_RESOURCE, else the start fails saying so."""
    st, out, err = await run_to_end(ctl, task(
        "oomup", "cat", "/proc/self/oom_score_adj", oom_score_adj=500, user="nobody"))
    assert st.exit_code == 0, err
    assert out.strip() == "500"
    cfg = task("oomdown", "cat", "/proc/self/oom_score_adj", oom_score_adj=-500)
    if not _has_cap_sys_resource():
        with pytest.raises(LaunchFailed, match=r"cannot set oom_score_adj -500: Permission "
                           r"denied \(lowering it needs CAP_SYS_RESOURCE"):  # fmt: skip
            await ctl.start(cfg)
        return
    st, out, err = await run_to_end(ctl, cfg)
    assert out.strip() == "-500", err


@needs_root
async def test_a_non_root_task_can_reopen_its_open_stdin(ctl: ProcessController) -> None:
    """As runc's fixStdioPermissions: the stdin pipe is the task's user's too."""
    await ctl.start(task("stdusr", "sh", "-c", "exec 3</dev/stdin && echo reopened; sleep 60",
                         user="nobody", stdin_open=True))
    await wait_for_output(ctl, "stdusr", "reopened")
    await ctl.stop("stdusr", grace=1.0)


@needs_root
async def test_a_tty_task_with_a_tiny_nofile_limit_still_gets_its_terminal(
        ctl: ProcessController) -> None:
    st, out, err = await run_to_end(ctl, task("ttynofile", "tty", tty=True,
                                              ulimits=(("nofile", 6, 6),)))
    assert (st.exit_code, out.strip()) == (0, "/dev/pts/0"), err
