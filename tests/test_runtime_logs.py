"""shoal.runtime logs: the shim's size-rotated, timestamped log files and read_logs/follow_logs.

Needs root (real tasks). Fixtures: tests/test_runtime_support.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path

from test_runtime_support import (
    needs_root,
    run_to_end,
    task,
    wait_exited,
)

from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState, RuntimeConfig

pytestmark = needs_root
pytest_plugins = ("test_runtime_support",)  # its fixtures

COUNT = "i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo line-$i-padding-padding; done"


async def test_logs_rotate_by_size_without_losing_lines_even_while_the_agent_is_down(
    config: RuntimeConfig, data_dir: Path
) -> None:
    cfg = dataclasses.replace(config, log_max_bytes=4096, log_max_files=3)
    first = ProcessController(cfg)
    await first.start(task("rot", "sh", "-c", "read x < /dev/null; sleep 0.2; "
                           + COUNT.format(n=3000)))
    await first.close()  # the agent is down while the task writes and the shim rotates
    exit_file = data_dir / "tasks" / "rot" / "exit"
    deadline = time.monotonic() + 20
    while not exit_file.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    second = ProcessController(cfg)
    try:
        await second.recover()
        taskdir = data_dir / "tasks" / "rot"
        files = sorted(p.name for p in taskdir.glob("stdout.log*"))
        assert files == ["stdout.log", "stdout.log.1", "stdout.log.2"]
        assert all((taskdir / f).stat().st_size <= 4096 for f in files)
        lines = [x.line for x in second.read_logs("rot")]
        numbers = [int(line.split("-")[1]) for line in lines]
        # What is kept is a gap-free run of the newest lines, up to the last one.
        assert numbers == list(range(numbers[0], 3001)), numbers[:5]
        assert 150 < len(numbers) < 400
        tail = second.read_logs("rot", tail=5)
        assert [x.line.split("-")[1] for x in tail] == ["2996", "2997", "2998", "2999", "3000"]
    finally:
        await second.close()


async def test_read_logs_tail_since_timestamps_and_stream_order(ctl: ProcessController) -> None:
    st, _, _ = await run_to_end(
        ctl, task("ts", "sh", "-c", "echo first; echo oops >&2; sleep 0.3; echo second")
    )
    assert st.exit_code == 0
    lines = ctl.read_logs("ts")
    assert [(x.stream, x.line) for x in lines] == [
        ("stdout", "first"), ("stderr", "oops"), ("stdout", "second"),
    ]
    assert lines[0].ts <= lines[1].ts < lines[2].ts - 0.2
    assert abs(lines[2].ts - time.time()) < 10
    assert [x.line for x in ctl.read_logs("ts", tail=1)] == ["second"]
    assert [x.line for x in ctl.read_logs("ts", since=lines[2].ts)] == ["second"]
    assert ctl.read_logs("ts", tail=0) == []
    stamped = ctl.read_logs("ts", timestamps=True)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z first", stamped[0].line)


async def test_partial_and_very_long_lines_come_back_whole(ctl: ProcessController) -> None:
    long = "x" * 40000
    st, _, _ = await run_to_end(
        ctl, task("long", "sh", "-c", f"echo {long}; printf 'no newline at the end'")
    )
    assert st.exit_code == 0
    assert [x.line for x in ctl.read_logs("long")] == [long, "no newline at the end"]


async def test_follow_yields_lines_as_they_come_and_ends_with_the_task(
    ctl: ProcessController,
) -> None:
    await ctl.start(task("fol", "sh", "-c", "echo one; sleep 0.4; echo two; sleep 0.4; echo three"))
    seen: list[tuple[str, float]] = []
    t0 = time.monotonic()

    async def consume() -> None:
        async for line in ctl.follow_logs("fol"):
            seen.append((line.line, time.monotonic() - t0))

    await asyncio.wait_for(consume(), 10)
    assert [s[0] for s in seen] == ["one", "two", "three"]
    assert seen[0][1] < seen[1][1] - 0.2 < seen[2][1] - 0.4  # delivered live, not at the end
    st = ctl.status("fol")
    assert st is not None and st.state is RunState.EXITED
    await wait_exited(ctl, "fol")
