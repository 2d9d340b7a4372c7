"""Nodes' architecture end to end (Swarm's ``node.platform.arch``): real agents on netns hosts,
a cluster made by the schema-10 release (``SCHEMA_10``), driven by the real CLI.

While the schema-10 node is there the cluster writes schema 10: the joins of today's agents
keep no arch (as the schema-10 replica's decoder drops it), and an arch constraint is refused
naming the field. Once that node runs today's code (upgraded in place, its agent restarted)
the leader raises the schema to 11: the running agents describe themselves (``node_describe``:
a manager directly, a worker through the dispatcher), and the restarted one does too — every
record gets ``uname -m``. Then ``--constraint node.platform.arch==$(uname -m)`` runs and ``!=``
stays pending with the scheduler's reason.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

import oldrelease
from netlab import Host, Lab, wait_until
from shoal.raft.schema import SCHEMA

pytestmark = pytest.mark.netns

SCHEMA_10 = "ccf4cf4"  # the last commit of schema 10 (before compose-fixes raised it to 11)
ARCH = os.uname().machine


def schema_of(h: Host) -> int:
    return int(json.loads(h.cli("info").stdout).get("cluster_schema", 0))


def arches(h: Host) -> dict[str, str]:
    """Host name → the architecture ``node inspect`` shows for it."""
    names = [n["hostname"] for n in h.cli_json("node", "ls")]
    return {n["hostname"]: n["platform"]["architecture"]
            for n in h.cli_json("node", "inspect", *names)}


def live(h: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in h.cli_json("service", "ps", service) if t["desired_state"] == "running"]


def test_nodes_report_their_arch_once_the_cluster_reads_it_and_constraints_place_by_it(
        lab_factory: Callable[..., Lab]) -> None:
    with oldrelease.old_release(SCHEMA_10) as rel:
        lab = lab_factory(3)
        old, h2, h3 = lab.hosts
        old.use_shoal(rel.argv, rel.env)
        lab.form_cluster(managers=2, workers=1, timeout=90)
        assert schema_of(h2) == 10
        assert arches(h2) == {"h1": "", "h2": "", "h3": ""}  # (none kept below schema 11)
        res = h2.cli("service", "create", "--name", "native", "--constraint",
                     f"node.platform.arch=={ARCH}", "--", "sleep", "100000", check=False)
        assert res.returncode != 0 and "task.placement.constraints" in res.stderr and \
            "upgrade every node first" in res.stderr, (res.stdout, res.stderr)

        # the schema-10 node upgraded in place: the schema is raised, every node describes
        # itself (h2 and h3 while they run, h1 after its restart)
        old.kill_agent(signal.SIGTERM, timeout=60)
        old.use_shoal()
        old.start_agent(timeout=60)
        wait_until(lambda: schema_of(h2) == SCHEMA, timeout=60, what=f"cluster schema {SCHEMA}")
        wait_until(lambda: arches(h2) == {"h1": ARCH, "h2": ARCH, "h3": ARCH}, timeout=30,
                   interval=0.5, what=f"every node's record saying {ARCH}")
        (rec,) = h2.cli_json("node", "inspect", "h3")
        # (the worker described itself, through a manager's dispatcher, without a restart)
        assert f"this node's record now says arch {ARCH}" in h3.agent_log.read_text()
        assert rec["platform"] == {"os": "linux", "architecture": ARCH}
        assert rec["resources"]["memory_bytes"] > 0 and rec["resources"]["cpus"] >= 1
        pretty = h2.cli("node", "inspect", "--pretty", "h1").stdout
        assert f" Architecture:\t\t{ARCH}" in pretty, pretty

        h2.cli("service", "create", "--name", "native", "--replicas", "3", "--constraint",
               f"node.platform.arch=={ARCH.upper()}", "--", "sleep", "100000")
        h2.cli("service", "create", "--name", "foreign", "--constraint",
               f"node.platform.arch!={ARCH}", "--", "sleep", "100000")
        wait_until(lambda: sorted(t["state"] for t in live(h2, "native")) == ["running"] * 3,
                   timeout=60, interval=0.5, what="the three native tasks running")
        reason = f"no node satisfies node.platform.arch!={ARCH}"
        wait_until(lambda: [(t["state"], t["message"]) for t in live(h2, "foreign")]
                   == [("pending", reason)], timeout=30, interval=0.5,
                   what="the foreign task pending with the scheduler's reason")
