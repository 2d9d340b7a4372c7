"""`shoal swarm update --task-history-limit N` (Swarm's TaskHistoryRetentionLimit) in a real
one-node cluster: the leader keeps N dead tasks per slot of a crash-looping service instead
of the default 3, `info` shows the setting, and a bad value is refused naming the flag.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from netlab import Lab, wait_until


def test_the_cluster_keeps_as_many_dead_tasks_per_slot_as_it_is_told(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    out = h1.cli("swarm", "update", "--task-history-limit", "1").stdout
    assert "Task history limit: 1 per slot." in out, out
    assert json.loads(h1.cli("info").stdout)["task_history_limit"] == 1  # (a pipe: JSON)
    text = h1.cli("info", "--format", "text").stdout  # (a person's, on a terminal)
    assert " Task history:   1 ended tasks a slot" in text and "the leader" in text, text
    assert h1.cli("info", "--format", "{{.TaskHistoryLimit}} {{.Role}}").stdout == "1 manager\n"
    assert "Server: the agent on h1" in h1.cli("version").stdout  # (docker version)
    # docker's `network prune` / `volume prune`: what nothing uses goes
    h1.cli("network", "create", "spare")
    h1.cli("volume", "create", "spare")
    assert h1.cli("network", "prune", "-f").stdout == "Deleted Networks:\nspare\n"
    assert h1.cli("volume", "ls", "-q", "-f", "dangling=true").stdout == "spare\n"
    assert h1.cli("volume", "ls", "-q", "-f", "dangling=false").stdout == ""
    # (Docker 23's: a named volume goes only with -a; without, the anonymous ones)
    assert h1.cli("volume", "prune", "-f").stdout == ""
    assert h1.cli("volume", "prune", "-f", "-a", "--filter", "label=x").stdout == ""
    assert h1.cli("volume", "prune", "-af").stdout == "Deleted Volumes:\nspare\n"
    assert h1.cli_json("network", "ls") == [] and h1.cli_json("volume", "ls") == []
    h1.cli("service", "create", "--name", "crash", "--restart-delay", "0", "--", "sh", "-c",
           "exit 1")
    seen: set[str] = set()

    def restarted_enough() -> bool | None:
        tasks = h1.cli_json("service", "ps", "crash")
        seen.update(t["id"] for t in tasks)
        per_slot = Counter(t["slot"] for t in tasks)
        assert max(per_slot.values()) <= 2, tasks  # the live one and 1 dead (default: 4)
        return len(seen) >= 6 or None
    wait_until(restarted_enough, timeout=60, what="6 runs of the crashing task")
    bad = h1.cli("swarm", "update", "--task-history-limit", "-1", check=False)
    assert bad.returncode != 0 and "task_history_limit" in bad.stderr, bad
