"""The overlay driver's pure planning (node/overlay.py) and per-network DNS (node/mesh.py):
state snapshot → forwarding entries, isolation rules, answers. No network."""

from __future__ import annotations

from dataclasses import replace

from shoal.node.mesh import STACK_LABEL, forwards_for, lookup, stack_lookup
from shoal.node.overlay import (
    Overlay,
    firewall_rules,
    mac_of,
    node_addr,
    remote_entries,
    vxlan_of,
)
from shoal.raft.models import Network, Node, NodeRole, Service, Task, TaskState, TaskStatus
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec

FRONT = Network(id="nf", name="front", subnet="10.96.0.0/24", gateway="10.96.0.1", vni=4096)
BACK = Network(id="nb", name="back", subnet="10.96.1.0/24", gateway="10.96.1.1", vni=4097,
               internal=True)


def service(sid: str, *networks: str, expose: bool = True) -> Service:
    spec = validate_spec({"name": sid, "task": {"container": {"command": ["x"]},
                                                "networks": list(networks)},
                          "endpoint": {"expose": [{"port": 80}] if expose else []}})
    return Service(id=sid, spec=spec, vip=f"10.98.0.{len(sid) + len(networks) + 1}")


def task(tid: str, svc: Service, node: str, **addrs: str) -> Task:
    return Task(id=tid, service_id=svc.id, service_name=svc.spec.name, slot=1,
                spec=svc.spec.task, service_version=1, node_id=node,
                status=TaskStatus(state=TaskState.RUNNING,
                                  addr=next(iter(addrs.values()), "10.99.0.5")),
                net_addrs=dict(addrs))


def snap() -> Snapshot:
    web, db, both = service("web", "front"), service("db", "back"), service("both", "front",
                                                                              "back")
    plain = service("plain")
    nodes = {f"n{i}": Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.77.0.1{i}", api_port=2377,
                           raft_port=2378, role=NodeRole.MANAGER, subnet=f"10.99.{i - 1}.0/24")
             for i in (1, 2)}
    tasks = [task("w1", web, "n1", front="10.96.0.2"), task("w2", web, "n2", front="10.96.0.3"),
             task("d1", db, "n2", back="10.96.1.2"),
             task("b1", both, "n1", front="10.96.0.4", back="10.96.1.3"),
             task("p1", plain, "n1")]
    return Snapshot(index=1, cluster=ClusterInfo(), nodes=nodes,
                    services={s.id: s for s in (web, db, both, plain)},
                    tasks={t.id: t for t in tasks}, networks={"nf": FRONT, "nb": BACK})


def test_forwarding_entries_name_every_remote_task_and_node_but_no_local_one() -> None:
    s = snap()
    got = remote_entries(s, "n1")
    assert got["front"] == {"10.96.0.3": "10.77.0.12",  # w2 on n2
                            "10.96.0.253": "10.77.0.12"}  # n2's own address (index 1)
    assert got["back"] == {"10.96.1.2": "10.77.0.12", "10.96.1.253": "10.77.0.12"}
    ended = replace(s.tasks["w2"], status=TaskStatus(state=TaskState.FAILED))
    s.tasks["w2"] = ended
    assert "10.96.0.3" not in remote_entries(s, "n1")["front"]
    assert mac_of("10.96.0.3") == "02:42:0a:60:00:03"


def test_rules_keep_traffic_inside_its_network_and_internal_networks_closed() -> None:
    fwd, vip, nat = firewall_rules(snap(), "shoal0")
    assert "-A SHOAL-NET -i shb4096 -o shb4096 -j ACCEPT" in fwd
    assert fwd.index("-A SHOAL-NET -i shb4096 -o shb4096 -j ACCEPT") < \
        fwd.index("-A SHOAL-NET -i shb4096 -o shb+ -j DROP")
    assert "-A SHOAL-NET -i shb4097 -j DROP" in fwd  # internal: no way out
    assert "-A SHOAL-NET -i shb4096 -j DROP" not in fwd
    assert nat == ["-A SHOAL-NET-NAT -s 10.96.0.0/24 ! -d 10.96.0.0/24 -j MASQUERADE"]
    web_vip, db_vip = snap().services["web"].vip, snap().services["db"].vip
    assert f"-A SHOAL-NET-VIP -d {web_vip}/32 -s 10.96.0.0/24 -j ACCEPT" in vip
    # the task on front and back sends from its front address: db's VIP lets it in
    assert f"-A SHOAL-NET-VIP -d {db_vip}/32 -s 10.96.0.4/32 -j ACCEPT" in vip
    assert f"-A SHOAL-NET-VIP -d {db_vip}/32 -s 10.96.0.0/24 -j ACCEPT" not in vip
    assert vip[-1].endswith("-i shoal0 -j DROP")


def test_names_resolve_only_on_shared_networks_with_addresses_on_that_network() -> None:
    s = snap()
    web, db = s.services["web"], s.services["db"]
    assert lookup(s, "web", asker="10.96.0.2") == [web.vip]  # a web task itself
    # front only: db is not there — an unknown name there (as Docker's: forwarded upstream,
    # so the answer neither says it exists nor hides an outside host of that name)
    assert lookup(s, "db", asker="10.96.0.2") is None
    assert lookup(s, "db", asker="10.96.0.4") == [db.vip]  # on both
    assert lookup(s, "tasks.both", asker="10.96.1.2") == ["10.96.1.3"]  # its back address
    assert lookup(s, "web", asker="10.99.0.5") is None  # a default-network task
    assert lookup(s, "plain", asker="10.99.0.5") is not None
    assert lookup(s, "db") == [db.vip]  # the node itself asks: no filter


def _synced(state: Snapshot) -> Overlay:
    """An Overlay on n1 whose devices match ``state`` (what a real ``_sync`` leaves)."""
    ov = Overlay("n1", "10.77.0.11", "shoal0")
    ov.mtu = 1450
    for nid, net in state.networks.items():
        ov._nets[nid], ov._addrs[nid] = net, node_addr(state, net, "n1")
    entries = remote_entries(state, "n1")
    for net in state.networks.values():
        ov._entries[vxlan_of(net)] = entries.get(net.name, {})
    ov._rules = firewall_rules(state, "shoal0")
    return ov


async def test_a_sync_that_would_change_nothing_stays_on_the_loop() -> None:
    """The mesh syncs twice a second; a pass with nothing to change must not hop to a thread
    (two wake-ups of an idle agent), and any change of networks, addresses, entries or
    isolation rules must."""
    state = snap()
    ov = _synced(state)
    calls: list[int] = []
    ov._sync = lambda s: calls.append(s.index)  # type: ignore[method-assign]
    await ov.sync(state)
    assert calls == []
    moved = replace(state, tasks={**state.tasks, "w2": replace(
        state.tasks["w2"], net_addrs={"front": "10.96.0.9"})})
    gone = replace(state, networks={"nf": FRONT})
    opened = replace(state, networks={"nf": FRONT, "nb": replace(BACK, internal=False)})
    assert firewall_rules(opened, "shoal0") != firewall_rules(state, "shoal0")
    for changed in (moved, gone, opened):
        assert not _synced(state)._settled(changed)
    await ov.sync(moved)
    assert calls == [moved.index]


def test_only_tasks_with_a_way_out_get_names_forwarded_upstream() -> None:
    """CVE-2024-29018's shape: a task on internal networks only ("back") could still send
    data out as DNS queries the node forwarded upstream. Not any more; a task with one
    network that is not internal, a default-network task and the node itself still can."""
    s = snap()
    assert forwards_for(s, "10.96.1.2") is False  # d1: back (internal) only
    assert forwards_for(s, "10.96.1.3") is True  # b1: back and front
    assert forwards_for(s, "10.96.0.2") is True  # w1: front
    assert forwards_for(s, "10.99.0.5") is True  # p1: the default network
    assert forwards_for(s, "10.77.0.11") is True  # not a task


def test_a_stacks_short_names_live_on_its_services_networks() -> None:
    """`db` asked by a task of stack st on `front` resolved to st_db although st_db is only
    on `back` (unreachable from front) — and hid a service `db` on front. Now st_db answers
    only where the asker shares a network with it; elsewhere `db` is looked up as usual."""
    s = snap()
    label = {STACK_LABEL: "st"}
    st_web = service("st_web", "front")
    st_web.spec.labels.update(label)  # (a test's own spec object)
    st_db = service("st_db", "back")
    db_front = service("db", "front")
    services = {**{k: v for k, v in s.services.items() if k != "db"},
                "st_web": st_web, "st_db": st_db, "db": db_front}
    tasks = {**s.tasks, "sw": task("sw", st_web, "n1", front="10.96.0.9")}
    s2 = replace(s, services=services, tasks=tasks)
    assert stack_lookup(s2, "db", "10.96.0.9") is None  # st_db is not on front
    assert lookup(s2, "db", asker="10.96.0.9") == [db_front.vip]  # so `db` is front's db
    both = service("st_both", "front", "back")
    s3 = replace(s2, services={**services, "st_both": both})
    assert stack_lookup(s3, "both", "10.96.0.9") == [both.vip]
