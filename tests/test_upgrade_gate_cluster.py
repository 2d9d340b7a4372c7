"""Fields added after schema 2, in a real mixed cluster (raft/schema.py ``GATED``): a manager
running a shoal 0.2 that predates autoscaling and pods (``PRE_PODS``: schema 2, a strict spec
decoder that refuses keys it does not know) leads; a manager on today's code joins (a newer
agent may join an older cluster). While that node is there the cluster writes schema 2:
a service created through today's CLI is applied by the older replica too (its spec goes
into the log without ``task.sidecars``, ``task.init_containers``, ``mode.autoscale``), and
a spec that uses them is refused naming the field, not half-applied. Once the older node
runs today's code the leader raises the schema to SCHEMA and the same spec goes. Netns hosts,
real agents, both CLIs.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import oldrelease
from netlab import Host, Lab, wait_until
from shoal.raft.schema import SCHEMA

pytestmark = pytest.mark.netns

PRE_PODS = "53cedc8"  # shoal 0.2 just before autoscaling and pods (schema 2)


def names(h: Host) -> set[str]:
    return {s["name"] for s in h.cli_json("service", "ls")}


def test_an_older_0_2_manager_applies_what_today_writes_and_the_later_fields_wait(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    with oldrelease.old_release(PRE_PODS) as rel:
        lab = lab_factory(2)
        old, new = lab.hosts
        old.use_shoal(rel.argv, rel.env)
        lab.form_cluster(managers=2, timeout=90)
        info: dict[str, Any] = json.loads(new.cli("info").stdout)
        assert info["cluster_schema"] == 2 and info["schema"] == SCHEMA, info

        new.cli("service", "create", "--name", "plain", "--", "sleep", "100000")
        wait_until(lambda: "plain" in names(old) and "plain" in names(new), timeout=30,
                   what="the service in the older replica too (its CLI lists it)")
        wait_until(lambda: [t["state"] for t in old.cli_json("service", "ps", "plain")]
                   == ["running"], timeout=60, what="its task running, made by the old leader")

        spec = {"name": "pod", "task": {"container": {"command": ["sleep", "100000"]},
                                        "sidecars": [{"name": "s", "command": ["sleep", "9"]}]}}
        path = tmp_path / "pod.yaml"
        path.write_text(json.dumps(spec))  # (JSON is YAML)
        path.chmod(0o644)
        tmp_path.chmod(0o755)
        for argv, field in ((["--spec", str(path)], "task.sidecars"),
                            (["--name", "auto", "--limit-cpu", "0.5", "--autoscale",
                              "max=3,cpu=50%", "--", "sleep", "100000"], "mode.autoscale")):
            res = new.cli("service", "create", *argv, check=False)
            assert res.returncode != 0 and field in res.stderr and \
                "upgrade every node first" in res.stderr, (res.stdout, res.stderr)
        assert names(old) == names(new) == {"plain"}

        # the older node upgraded in place: the leader raises the schema, the spec goes
        old.kill_agent(signal.SIGTERM, timeout=60)
        old.use_shoal()
        old.start_agent(timeout=60)

        def schema_of(h: Host) -> int:
            return int(json.loads(h.cli("info").stdout).get("cluster_schema", 0))
        wait_until(lambda: schema_of(old) == schema_of(new) == SCHEMA, timeout=60,
                   what=f"cluster schema {SCHEMA} once every node runs today's code")
        new.cli("service", "create", "--spec", str(path))
        wait_until(lambda: names(old) == {"plain", "pod"}, timeout=30,
                   what="the pod service on both managers")
