"""A task that fails to start after it got its address gives the address back (node/worker.py):
before, each launch failure kept one, and a crash-looping service exhausted the node's /24
within minutes (every later task on the node: "no free address").

A real one-node cluster on a netns host; the launch fails inside the launcher after the
network is attached (a sysctl the kernel lacks: exit 125 naming it).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from netlab import Lab, wait_until


def test_a_task_that_fails_to_start_gives_its_address_back(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "broken", "--restart-delay", "0", "--sysctl",
           "net.ipv4.no_such_key=1", "--", "sleep", "100000")
    seen: set[str] = set()

    def failures() -> bool | None:
        tasks = h1.cli_json("service", "ps", "broken")
        seen.update(t["id"] for t in tasks if "no_such_key" in (t["error"] or ""))
        return len(seen) >= 5 or None
    wait_until(failures, timeout=60, what="5 failed starts")
    addrs = json.loads((h1.data_dir / "network.json").read_text())["addrs"]
    assert len(addrs) <= 1, addrs  # (at most the one being started now)
    h1.cli("service", "create", "--name", "fine", "--", "sleep", "100000")
    wait_until(lambda: [t for t in h1.cli_json("service", "ps", "fine")
                        if t["state"] == "running"] or None, timeout=30, what="fine running")
