"""The fault suite's checker (tests/jepsen_check.py) on hand-made histories: it accepts
linearizable ones and finds each kind of violation (a checker that cannot fail proves
nothing)."""

from __future__ import annotations

from jepsen_check import INF, Op, check_register, check_set


def _cas(p: int, t0: float, t1: float, expected: int, new: int, result: str = "ok",
         version: int | None = None) -> Op:
    return Op(p, "cas", "r", (expected, new, version), t0, t1 if result != "info" else INF,
              result)


def _read(p: int, t0: float, t1: float, version: int, replicas: int) -> Op:
    return Op(p, "read", "r", (version, replicas), t0, t1, "ok")


def test_a_sequential_history_is_linearizable() -> None:
    ops = [_read(1, 0, 1, 1, 0), _cas(1, 2, 3, 1, 2, version=2), _read(2, 4, 5, 2, 2),
           _cas(2, 6, 7, 2, 2, version=2), _read(1, 8, 9, 2, 2)]
    assert check_register("r", ops, (1, 0)).ok


def test_concurrent_ops_may_take_effect_in_either_order() -> None:
    # the read overlaps the cas: it may see the register before or after it
    ops = [_cas(1, 0, 10, 1, 3, version=2), _read(2, 1, 2, 1, 0), _read(3, 3, 4, 2, 3)]
    assert check_register("r", ops, (1, 0)).ok


def test_a_stale_read_after_an_acknowledged_write_is_found() -> None:
    """The deposed-leader read: the cas completed before the read began, yet the read
    returns the old value."""
    ops = [_read(1, 0, 1, 1, 0), _cas(1, 2, 3, 1, 2, version=2), _read(2, 4, 5, 1, 0)]
    res = check_register("r", ops, (1, 0))
    assert not res.ok and not res.bounded
    assert res.stuck is not None and res.stuck.f == "read" and res.stuck.invoke == 4
    assert "NOT linearizable" in res.report() and "p2" in res.report()


def test_two_successful_cas_on_one_version_are_found() -> None:
    ops = [_cas(1, 0, 2, 1, 1, version=2), _cas(2, 0, 2, 1, 2, version=2)]
    assert not check_register("r", ops, (1, 0)).ok


def test_an_unknown_cas_may_or_may_not_have_happened() -> None:
    applied = [_cas(1, 0, 1, 1, 2, result="info"), _read(2, 5, 6, 2, 2)]
    assert check_register("r", applied, (1, 0)).ok
    not_applied = [_cas(1, 0, 1, 1, 2, result="info"), _read(2, 5, 6, 1, 0)]
    assert check_register("r", not_applied, (1, 0)).ok
    # but never before it was invoked
    early = [_read(2, 0, 1, 2, 2), _cas(1, 5, 6, 1, 2, result="info")]
    assert not check_register("r", early, (1, 0)).ok


def test_many_unknown_cas_do_not_explode_the_search() -> None:
    ops = [_cas(p, 0, 0, 1, 1, result="info") for p in range(40)]
    ops += [_cas(1, i + 1, i + 1.5, i + 1, 1 if i % 2 else 2, version=i + 2)
            for i in range(1, 30)]
    res = check_register("r", [_cas(9, 0.1, 0.9, 1, 2, version=2), *ops], (1, 0))
    assert res.ok and not res.bounded


def test_set_lost_and_invented_creates_and_stale_list_reads() -> None:
    ops = [Op(1, "create", "a", None, 0, 1, "ok"), Op(2, "create", "b", None, 0, 1, "ok"),
           Op(3, "create", "c", None, 0, INF, "info"), Op(4, "create", "d", None, 0, 1, "fail"),
           Op(5, "list", "", ["a", "reg"], 2, 3, "ok"),  # misses b, acknowledged before
           Op(5, "list", "", ["a", "b", "e", "reg"], 4, 5, "ok")]  # e: never created
    res = check_set(ops, ["a", "c", "d", "x", "reg"], preexisting=["reg"])
    assert res.acknowledged == 2 and res.unknown == 1
    assert res.lost == ["b"] and res.invented == ["d", "x"]
    assert len(res.read_violations) == 2 and not res.ok
    good = check_set(ops[:3], ["a", "b"], preexisting=[])
    assert good.ok
