"""Which peers a node asks for an image's layers (``Transfer._peers_serve``), against the rule
the peers apply (``check_image_access``, end to end in tests/test_image_access_cluster.py): a
worker asks them only for the images of its own live tasks once the cluster reads schema 13 —
a worker's `image pull` or build of another image goes to the registry at once, instead of
waiting on each peer's refusal (up to 3 s a peer, a layer)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from gates import cluster_at

from shoal.node.transfer import Transfer
from shoal.raft.models import NodeRole, to_dict
from shoal.raft.schema import IMAGE_ACCESS
from shoal.raft.validate import validate_spec


def _transfer(schema: int, role: NodeRole, task_desired: int | None) -> Transfer:
    st = cluster_at(schema)
    spec = to_dict(validate_spec({"name": "web", "task": {
        "container": {"image": "busybox:1", "command": ["sh"]},
        "sidecars": [{"name": "probe", "image": "probe:1", "command": ["sh"]}]}}))
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})["ok"]
    if task_desired is not None:
        task = {"id": "t1", "service_id": "s1", "service_name": "web", "slot": 1,
                "spec": spec["task"], "service_version": 1, "node_id": "n2",
                "desired_state": task_desired, "status": {"state": 512}}
        assert st.apply({"op": "leader", "term": 1, "now": 2.0,
                         "ops": [("create", task)]})["ok"]
    ctx: Any = SimpleNamespace(store=SimpleNamespace(snapshot=st.snapshot),
                               identity=SimpleNamespace(node_id="n2", role=role))
    return Transfer(ctx, security=None, runtime=None, images=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("schema", "role", "desired", "image", "asks"), [
    (IMAGE_ACCESS, NodeRole.WORKER, 512, "busybox:1", True),  # its running task's image
    (IMAGE_ACCESS, NodeRole.WORKER, 512, "probe:1", True),  # its sidecar's
    (IMAGE_ACCESS, NodeRole.WORKER, 512, "other:1", False),  # `image pull other:1`
    (IMAGE_ACCESS, NodeRole.WORKER, None, "busybox:1", False),  # no task of it
    (IMAGE_ACCESS, NodeRole.WORKER, 640, "busybox:1", False),  # a task told to stop
    (IMAGE_ACCESS, NodeRole.MANAGER, None, "other:1", True),  # managers read any
    (IMAGE_ACCESS - 1, NodeRole.WORKER, None, "other:1", True),  # (older peers: any)
])
def test_a_worker_asks_peers_only_for_its_own_tasks_images(
        schema: int, role: NodeRole, desired: int | None, image: str, asks: bool) -> None:
    assert _transfer(schema, role, desired)._peers_serve(image) is asks
