"""Horizontal autoscaling end to end (issue 17, must-show 1 in short windows): a real agent
on a netns host, driven by the CLI. A CPU-bound service (a busy loop in ``sh`` limited to
0.2 CPU) with ``--autoscale min=1,max=3,cpu=50%`` scales up from its tasks' cgroup usage,
never beyond max; when the load stops it scales down once the (short) stabilisation window
has passed. Manual `service scale` is refused naming --autoscale, and --autoscale on a
global service is refused naming the flag. (The 10-minute no-flapping run is
bench/autoscale_bench.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from netlab import CommandError, Host, Lab, wait_until

pytestmark = pytest.mark.netns

# burns its CPU limit unless /ctl/stop exists (the test's switch, bind-mounted from the host)
BURN = ("sh", "-c", "while :; do if [ -e /ctl/stop ]; then sleep 0.5; else i=0; "
        "while [ $i -lt 20000 ]; do i=$((i+1)); done; fi; done")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(1)
    try:
        lab.form_cluster(managers=1)
        yield lab
    finally:
        left = lab.close()
        assert not left, f"lab teardown left things behind: {left}"


def inspect(h: Host) -> dict[str, Any]:
    out: dict[str, Any] = h.cli_json("service", "inspect", "burn")[0]
    return out


def running(h: Host) -> int:
    return sum(1 for t in h.cli_json("service", "ps", "burn")
               if t["desired_state"] == "running" and t["state"] == "running")


def test_cpu_bound_service_scales_up_to_max_and_back_down_after_stabilisation(lab: Lab
                                                                                ) -> None:
    h = lab.hosts[0]
    ctl = h.data_dir / "ctl"
    ctl.mkdir()
    h.cli("service", "create", "--name", "burn", "--limit-cpu", "0.2",
          "--autoscale", "min=1,max=3,cpu=50%,window=4s,period=2s,stabilization=12s",
          "--mount", f"type=bind,src={ctl},dst=/ctl,readonly", "--", *BURN)
    seen: list[int] = []

    def replicas_are(n: int) -> dict[str, Any] | None:
        svc = inspect(h)
        seen.append(svc["spec"]["mode"]["replicas"])
        return svc if svc["spec"]["mode"]["replicas"] == n and running(h) == n else None

    svc = wait_until(lambda: replicas_are(3), timeout=60, what="scaled up to max (3)")
    ups = [d for d in svc["autoscale"]["decisions"] if d["desired"] > d["current"]]
    assert ups and all(d["metric"] == "cpu" and d["usage"] > 0.5 for d in ups), ups
    assert "scale up" in ups[0]["reason"]
    # `shoal stats` (docker stats over the cluster): each busy task near its 0.2 CPU limit
    # (of one core), its memory against the node's (no limit of its own)
    stats = h.cli_json("stats", "--no-stream", "--node", "self", "burn")
    assert len(stats) == 3 and {r["name"].rsplit(".", 1)[0] for r in stats} == {"burn"}
    for r in stats:
        assert 5 < r["cpu_percent"] <= 30 and r["pids"] >= 1, r
        assert 0 < r["memory_bytes"] < r["memory_limit"] and r["node"] == h.name, r
    line = h.cli("stats", "--no-stream", "--format", "{{.Name}} {{.CPUPerc}} {{.MemUsage}}",
                 "burn").stdout.splitlines()[0].split()
    assert line[0].startswith("burn.") and line[1].endswith("%") and line[3] == "/", line
    # manual scaling of an autoscaled service is refused, naming --autoscale
    with pytest.raises(CommandError) as err:
        h.cli("service", "scale", "burn=5")
    assert "--autoscale" in err.value.stderr + err.value.stdout
    # the load stops: back to min once the stabilisation window has passed
    (ctl / "stop").touch()
    svc = wait_until(lambda: replicas_are(1), timeout=60, what="scaled down to min (1)")
    last = svc["autoscale"]["decisions"][-1]
    assert last["desired"] == 1 and last["usage"] < 0.5, last
    assert max(seen) <= 3, seen  # never beyond max
    # turning it off gives the replica count back to the user
    h.cli("service", "update", "--autoscale-rm", "burn")
    h.cli("service", "scale", "burn=2")
    assert inspect(h)["spec"]["mode"]["replicas"] == 2
    h.cli("service", "rm", "burn")


def test_autoscale_on_a_global_service_is_refused_naming_the_flag(lab: Lab) -> None:
    h = lab.hosts[0]
    with pytest.raises(CommandError) as err:
        h.cli("service", "create", "--name", "g", "--mode", "global",
              "--autoscale", "min=1,max=3,cpu=50%", "--", "sleep", "100")
    assert "--autoscale" in err.value.stderr + err.value.stdout
