"""What every gated spec value's tests check (raft/schema.py's gates), shared by the tests of
each schema's values: a cluster at a schema, the gate on propose and in the state machine, what
an older node is given to read, and what an older release's own state machine does with a log.

Owns: ``cluster_at``, ``assert_waits_for``, ``written_below``, ``old_release_results``. Must
not touch: agents, network namespaces (tests/netlab.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import msgpack
import pytest

from shoal.raft.errors import ValidationError
from shoal.raft.schema import encode_command
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_to_bytes


def cluster_at(schema: int) -> ClusterState:
    """A state machine of a cluster that writes ``schema``."""
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": schema})
    return st


def assert_waits_for(schema: int, full: dict[str, Any], plain: dict[str, Any],
                     field: str) -> None:
    """A service spec ``full`` using a value of ``schema`` is refused naming ``field`` while
    the cluster writes ``schema - 1`` — a create and an update, by the proposer
    (``encode_command``) and by the state machine — while ``plain``, without it, is taken;
    once the cluster writes ``schema`` the update goes."""
    below = schema - 1
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": full}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, below)
    assert exc.value.field == field and f"schema {schema}" in exc.value.message
    st = cluster_at(below)
    assert st.apply(cmd)["error"]["field"] == field and "s1" not in st.services
    assert st.apply(encode_command({**cmd, "spec": plain}, {}, below))["ok"]
    upd = {"op": "service_update", "id": "s1", "now": 2.0, "spec": full}
    with pytest.raises(ValidationError):
        encode_command(upd, {}, below)
    assert st.apply(upd)["error"]["field"] == field
    st.apply({"op": "cluster_schema", "schema": schema})
    assert encode_command(upd, {}, schema) == upd and st.apply(upd)["ok"]


def written_below(schema: int, full: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the create command's spec, the spec in the state's bytes)`` of spec ``full``
    created while the cluster writes ``schema - 1``: what an older node reads."""
    cmd = encode_command({"op": "service_create", "id": "s1", "now": 1.0, "spec": full}, {},
                         schema - 1)
    st = cluster_at(schema - 1)
    assert st.apply(cmd)["ok"]
    raw = msgpack.unpackb(state_to_bytes(st), raw=False, strict_map_key=False)
    return cmd["spec"], raw["services"]["s1"]["spec"]


def old_release_results(commit: str, schema: int, specs: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """What the state machine of release ``commit`` (a cluster writing ``schema``) answers to
    a create of each of ``specs`` (named s0, s1...), after its cluster_init (result 0)."""
    from test_mixed_state_bytes import PROBE

    import oldrelease

    log: list[dict[str, Any]] = [{"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                                  "worker_secret": "", "manager_secret": "", "digest": "",
                                  "schema": schema}]
    log += [{"op": "service_create", "id": f"s{i}", "now": 2.0,
             "spec": {**spec, "name": f"s{i}"}} for i, spec in enumerate(specs)]
    with oldrelease.old_release(commit) as rel:
        res = subprocess.run(rel.python_c(PROBE), input=json.dumps(log), capture_output=True,
                             text=True, check=False, timeout=60,
                             env={**os.environ, **rel.env}, cwd=rel.root)
    assert res.returncode == 0, res.stderr
    results: list[dict[str, Any]] = json.loads(res.stdout)["results"]
    return results
