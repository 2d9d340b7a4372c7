"""`shoal agent` flags that only reach a component's config: --cgroup-parent (the parent of
the node's task cgroups, node/config.py → shoal.runtime's RuntimeConfig.cgroup_parent, which
tests/test_runtime.py exercises with a per-run parent on real cgroups)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.cli.main import build_parser
from shoal.node.config import AgentConfig


def test_cgroup_parent_defaults_to_shoal_and_takes_a_name() -> None:
    parser = build_parser()
    base = ["agent", "--advertise-addr", "10.0.0.1"]
    assert parser.parse_args(base).cgroup_parent == "shoal"
    assert parser.parse_args([*base, "--cgroup-parent", "shoal-h7"]).cgroup_parent == "shoal-h7"
    AgentConfig(advertise_addr="10.0.0.1", cgroup_parent="shoal-h7").validate()


@pytest.mark.parametrize("bad", ["a/b", "", "..", ".", "x y", "../shoal"])
def test_a_cgroup_parent_that_is_not_one_name_is_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ValueError, match="--cgroup-parent must be one cgroup name"):
        AgentConfig(data_dir=Path("/tmp/x"), advertise_addr="10.0.0.1",
                    cgroup_parent=bad).validate()


def test_generic_resources_given_to_the_agent_land_in_its_node_record() -> None:
    """`shoal agent --generic-resource GPU=a --generic-resource GPU=b --generic-resource
    SSD=2` (Swarm's node-generic-resources): the node record it joins with advertises them;
    a bad item is refused naming the flag."""
    from types import SimpleNamespace

    from shoal.node.lifecycle import MembershipLifecycle

    args = build_parser().parse_args(["agent", "--advertise-addr", "10.0.0.1",
                                      "--generic-resource", "GPU=a", "--generic-resource",
                                      "GPU=b", "--generic-resource", "SSD=2"])
    cfg = AgentConfig(advertise_addr="10.0.0.1",
                      generic_resources=tuple(args.generic_resource))
    cfg.validate()
    record = MembershipLifecycle._self_node(
        SimpleNamespace(hostname="h1", config=cfg),  # type: ignore[arg-type]
        "n1", "worker")
    assert record["generic_resources"] == {"GPU": ["a", "b"], "SSD": 2}
    for bad in ("GPU", "bad kind=1", "SSD=2\0"):
        with pytest.raises(ValueError, match="--generic-resource"):
            AgentConfig(advertise_addr="10.0.0.1", generic_resources=(bad,)).validate()
