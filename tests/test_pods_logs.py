"""A pod's sidecar keeps its logs across its restarts (node/pod.py): its earlier runs' output
is read on through the same container id, within the runtime's per-stream file budget.

Needs root (real tasks through shoal.runtime's ProcessController). Fixtures:
tests/test_runtime_support.py.
"""

from __future__ import annotations

import asyncio
import time

from test_runtime_support import needs_root, task

from shoal.node.health import HealthMonitor
from shoal.node.pod import KEEP_LOG_FILES, Pods, container_id
from shoal.raft.models import Task
from shoal.raft.spec import SidecarSpec, TaskSpec
from shoal.raft.validate import validate_spec
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState, RuntimeConfig, TaskConfig

pytestmark = needs_root
pytest_plugins = ("test_runtime_support",)  # its fixtures

RUN = 'echo "run $(cat /proc/sys/kernel/random/uuid)"; echo oops >&2; exit 3'


def pod_task() -> Task:
    spec = validate_spec({"name": "web", "task": {
        "container": {"command": ["web"]},
        "sidecars": [{"name": "side", "command": ["sh", "-c", RUN],
                      "restart": {"condition": "on-failure", "delay": 0}}]}})
    assert isinstance(spec.task, TaskSpec)
    return Task(id="t1", service_id="s1", service_name="web", slot=1, spec=spec.task,
                service_version=1)


async def config_of(t: Task, c: SidecarSpec, pid: int) -> TaskConfig:
    return task(container_id(t.id, c.name), *c.command)  # (no netns to join: only output)


async def test_a_restarted_sidecar_keeps_the_logs_of_its_earlier_runs(
        ctl: ProcessController, config: RuntimeConfig) -> None:
    """Each run prints a line of its own; after each restart the container's logs hold the
    last KEEP_LOG_FILES runs in order (both streams), the oldest fallen off as a rotation
    drops it; removing the pod leaves nothing behind."""
    pods = Pods(ctl, HealthMonitor(), config_of, lambda: None)
    t, cid = pod_task(), container_id("t1", "side")
    pods.start_sidecars(t, 1)
    runs: list[str] = []

    def stream(name: str) -> list[str]:
        return [x.line for x in ctl.read_logs(cid) if x.stream == name] \
            if ctl.status(cid) is not None else []

    for n in range(1, 5):
        async with asyncio.timeout(20):  # (this run ended, its own line written)
            while True:
                st, out = ctl.status(cid), stream("stdout")
                if st is not None and st.state is RunState.EXITED and out and \
                        out[-1] not in runs:
                    break
                await asyncio.sleep(0.02)
        runs.append(out[-1])
        assert out == runs[-KEEP_LOG_FILES:], (out, runs)
        assert stream("stderr") == ["oops"] * len(out)
        if n < 4:
            pods.tend(t, 1, now=time.time())  # restarts it (on-failure, delay 0)
    assert len(set(runs)) == 4 and KEEP_LOG_FILES < 4
    await pods.remove("t1")
    assert ctl.tasks() == {} and list(config.tasks_dir.iterdir()) == []
    assert list((config.tasks_dir.parent / "held-logs").iterdir()) == []
