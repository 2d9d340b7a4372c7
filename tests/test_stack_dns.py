"""A stack's short names (node/mesh.py ``stack_lookup``, node/dns.py ``scoped``): a task of stack
X resolves ``web`` to X_web, as Swarm's stack network alias does; a task outside any stack, or
another stack's task, does not. The pure lookup on a snapshot, then the DNS server over real
UDP on loopback (the asker's address is the query's source address)."""

from __future__ import annotations

from test_dns import ask as dns_ask
from test_dns import ips

from shoal.node.dns import serve
from shoal.node.mesh import lookup, stack_lookup
from shoal.raft.models import Service, Task, TaskState, TaskStatus
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec

LABEL = "com.docker.stack.namespace"


def service(sid: str, name: str, stack: str = "", ports: bool = False) -> Service:
    spec = validate_spec({"name": name, "labels": {LABEL: stack} if stack else {},
                          "task": {"container": {"command": ["x"]}},
                          "endpoint": {"ports": [{"published": 8000 + len(sid),
                                                  "target": 80}] if ports else []}})
    return Service(id=sid, spec=spec, vip=f"10.98.0.{len(sid) + 1}" if ports else "")


def task(tid: str, svc: Service, addr: str) -> Task:
    return Task(id=tid, service_id=svc.id, service_name=svc.spec.name, slot=1,
                spec=svc.spec.task, service_version=1, desired_state=TaskState.RUNNING,
                node_id="n1", status=TaskStatus(state=TaskState.RUNNING, addr=addr))


def world() -> Snapshot:
    a_web = service("a1", "a_web", "a", ports=True)
    a_api = service("a22", "a_api", "a")
    b_api = service("b333", "b_api", "b")
    plain = service("p4444", "web")  # a service named "web" outside any stack
    tasks = [task("t1", a_web, "127.0.0.1"), task("t2", a_api, "10.99.0.5"),
             task("t3", b_api, "10.99.0.6"), task("t4", plain, "10.99.0.7")]
    return Snapshot(index=1, cluster=ClusterInfo(), nodes={},
                    services={s.id: s for s in (a_web, a_api, b_api, plain)},
                    tasks={t.id: t for t in tasks})


def test_a_stack_task_finds_its_stacks_services_by_short_name() -> None:
    s = world()
    assert stack_lookup(s, "api", "127.0.0.1") == ["10.99.0.5"]  # a_web asks: a_api
    assert stack_lookup(s, "tasks.api", "127.0.0.1") == ["10.99.0.5"]
    assert stack_lookup(s, "web", "10.99.0.5") == lookup(s, "a_web") == ["10.98.0.3"]
    assert stack_lookup(s, "api", "10.99.0.6") == ["10.99.0.6"]  # b's own api, not a's


def test_outside_a_stack_short_names_are_not_rewritten() -> None:
    s = world()
    assert stack_lookup(s, "api", "10.99.0.7") is None  # the plain service's task
    assert stack_lookup(s, "api", "10.1.1.1") is None  # not a task at all
    assert stack_lookup(s, "nope", "127.0.0.1") is None  # no a_nope: the global names decide


async def test_the_dns_server_answers_by_who_asks() -> None:
    s = world()
    transport, _ = await serve(lambda name: lookup(s, name), "127.0.0.1", 0,
                               scoped=lambda name, client: stack_lookup(s, name, client))
    port = transport.get_extra_info("sockname")[1]

    async def ask(name: str) -> list[str]:
        return ips(await dns_ask(port, name))

    try:
        # the asker is 127.0.0.1: a_web's task. "web" is its own stack's, not the plain one
        assert await ask("api") == ["10.99.0.5"]
        assert await ask("web.shoal") == ["10.98.0.3"]  # (the plain web: 10.99.0.7)
        assert await ask("b_api") == ["10.99.0.6"]  # full names still resolve
    finally:
        transport.close()
