"""shoal.lb without sockets: endpoint selection, table updates and draining, validation, and
the control-message boundary (nothing but WireError comes out of decode, whatever the bytes)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.lb import (
    Algorithm,
    Config,
    ConfigError,
    Endpoint,
    Frontend,
    InvalidService,
    Proto,
    ServiceLB,
)
from shoal.lb.errors import WireError
from shoal.lb.model import Listener, Listeners
from shoal.lb.table import ServiceTable
from shoal.lb.wire import MessageType, decode, encode


def svc(*eps: Endpoint, algorithm: Algorithm = Algorithm.ROUND_ROBIN) -> ServiceLB:
    return ServiceLB("web", target_port=80, frontends=(Frontend(8080),), endpoints=eps,
                     algorithm=algorithm)


def ep(task: str, deadline: float | None = None) -> Endpoint:
    return Endpoint(f"10.0.0.{int(task[1:]) + 1}", task, drain_deadline=deadline)


def table_of(*eps: Endpoint, algorithm: Algorithm = Algorithm.ROUND_ROBIN) -> ServiceTable:
    t = ServiceTable("web")
    t.update(svc(*eps, algorithm=algorithm), now_loop=100.0, now_wall=1000.0,
             drain_timeout=10.0)
    return t


def test_round_robin_cycles_and_skips_endpoints_in_fail_backoff() -> None:
    t = table_of(ep("t0"), ep("t1"), ep("t2"))
    picks = [t.pick(100.0) for _ in range(6)]
    assert [p.task_id for p in picks if p] == ["t0", "t1", "t2"] * 2
    t.eligible[1].down_until = 101.0  # t1 just refused a connection
    assert [p.task_id for p in (t.pick(100.5) for _ in range(4)) if p] == ["t0", "t2"] * 2
    assert {p.task_id for p in (t.pick(101.5) for _ in range(3)) if p} == {"t0", "t1", "t2"}


def test_every_endpoint_in_backoff_still_gets_tried_and_exclusion_ends_the_retries() -> None:
    t = table_of(ep("t0"), ep("t1"))
    for e in t.eligible:
        e.down_until = 200.0
    first = t.pick(100.0)
    assert first is not None
    second = t.pick(100.0, exclude=[first])
    assert second is not None and second is not first
    assert t.pick(100.0, exclude=[first, second]) is None


def test_least_connections_prefers_fewest_active_and_breaks_ties_round_robin() -> None:
    t = table_of(ep("t0"), ep("t1"), ep("t2"), algorithm=Algorithm.LEAST_CONNECTIONS)
    t.eligible[0].active = 5
    t.eligible[1].active = 2
    t.eligible[2].active = 2
    picks = {p.task_id for p in (t.pick(100.0) for _ in range(4)) if p}
    assert picks == {"t1", "t2"}


def test_update_keeps_counters_of_surviving_endpoints_and_drains_the_rest() -> None:
    t = table_of(ep("t0"), ep("t1"))
    t0, t1 = t.eligible
    t0.total, t1.active = 7, 2
    changed = t.update(svc(ep("t0"), ep("t2")), now_loop=100.0, now_wall=1000.0,
                       drain_timeout=10.0)
    assert [e.task_id for e in t.eligible] == ["t0", "t2"]
    assert t.eligible[0] is t0 and t0.total == 7
    assert changed == [t1] and t1.deadline == 110.0  # default drain: drain_timeout
    assert t.draining == {t1.key: t1}


def test_drain_deadline_is_converted_from_wall_clock_and_undrain_cancels_it() -> None:
    t = table_of(ep("t0"), ep("t1"))
    changed = t.update(svc(ep("t0", deadline=1003.0), ep("t1")), now_loop=100.0,
                       now_wall=1000.0, drain_timeout=10.0)
    assert [e.task_id for e in changed] == ["t0"] and changed[0].deadline == 103.0
    assert [e.task_id for e in t.eligible] == ["t1"]

    class Timer:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    timer = Timer()
    changed[0].timer = timer
    t.update(svc(ep("t0"), ep("t1")), now_loop=101.0, now_wall=1001.0, drain_timeout=10.0)
    assert timer.cancelled and [e.task_id for e in t.eligible] == ["t0", "t1"]


def test_idle_endpoint_that_disappears_is_forgotten_at_once() -> None:
    t = table_of(ep("t0"), ep("t1"))
    assert t.update(svc(ep("t0")), 100.0, 1000.0, 10.0) == []
    assert t.draining == {}


@pytest.mark.parametrize(("bad", "field"), [
    (ServiceLB("", 80), "name"),
    (ServiceLB("web", 0), "target_port"),
    (ServiceLB("web", 80, frontends=(Frontend(80), Frontend(80))), "frontends[1]"),
    (ServiceLB("web", 80, frontends=(Frontend(80, "sctp"),)),  # type: ignore[arg-type]
     "frontends[0].proto"),
    (ServiceLB("web", 80, endpoints=(Endpoint("web-1", "t"),)), "endpoints[0].addr"),
    (ServiceLB("web", 80, endpoints=(Endpoint("10.0.0.1", "t"), Endpoint("10.0.0.2", "t"))),
     "endpoints[1].task_id"),
    (ServiceLB("web", 80, endpoints=(Endpoint("10.0.0.1", "t", drain_deadline=float("nan")),)),
     "endpoints[0].drain_deadline"),
    (ServiceLB("web", 80, vip="not-an-ip"), "vip"),
])
def test_invalid_tables_name_the_offending_field(bad: ServiceLB, field: str) -> None:
    with pytest.raises(InvalidService) as err:
        bad.validate()
    assert err.value.field == field


def test_vip_listeners_and_wildcard_conflicts() -> None:
    s = ServiceLB("web", 80, frontends=(Frontend(8080), Frontend(53, Proto.UDP)),
                  vip="10.9.0.2")
    got = {str(x) for x in Listeners.of(s, ("0.0.0.0",)).items}
    assert got == {"0.0.0.0:8080/tcp", "0.0.0.0:53/udp", "10.9.0.2:80/tcp", "10.9.0.2:80/udp"}
    wild = Listener("0.0.0.0", 80, Proto.TCP)
    assert wild.conflicts(Listener("10.9.0.2", 80, Proto.TCP))
    assert not wild.conflicts(Listener("10.9.0.2", 80, Proto.UDP))
    assert not Listener("10.0.0.1", 80, Proto.TCP).conflicts(Listener("10.9.0.2", 80, Proto.TCP))


def test_wire_round_trip_of_a_table() -> None:
    s = svc(ep("t0"), Endpoint("10.0.0.9", "t9", port=81, drain_deadline=5.0),
            algorithm=Algorithm.LEAST_CONNECTIONS)
    msg = decode(encode(MessageType.SET_SERVICE, 3, {"service": s.to_wire()}))
    assert msg.type is MessageType.SET_SERVICE and msg.id == 3
    assert ServiceLB.from_wire(msg.body["service"]) == s


@given(st.binary(max_size=256))
def test_decode_raises_only_wire_errors_for_any_bytes(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4),
                    max_leaves=20))
def test_from_wire_raises_only_invalid_service_for_any_shape(data: object) -> None:
    with contextlib.suppress(InvalidService):
        ServiceLB.from_wire(data)


def test_config_validation() -> None:
    Config().validate()
    Config.local().validate()
    with pytest.raises(ConfigError) as err:
        Config(workers=0).validate()
    assert err.value.field == "workers"
    with pytest.raises(ConfigError):
        Config(listen_addrs=("localhost",)).validate()
