"""A scheduled job's schedule (``mode.schedule``: beyond Swarm, Nomad's periodic jobs and
Kubernetes' CronJob): the record, its checks, and the cron expression reader.

Owns: ``Schedule`` (re-exported by shoal.raft.spec with the other spec records) and
``parse_cron``. Must not touch: the clock (every check runs from a fixed date, so every
replica judges a schedule alike), the store; when runs start is shoal.node.cron's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from shoal.raft.errors import SpecError
from shoal.raft.podspec import _Spec, decl

MAX_SCHEDULE_HISTORY = 100


def parse_cron(expr: str, tz: str = "", start: float = 946684800.0) -> Any:
    """A cron expression checked and ready to iterate (a ``croniter`` at ``start``): 5
    fields (minute hour day-of-month month day-of-week), or 6 with the seconds first (as
    Nomad's and Quartz's), or a macro (@yearly @annually @monthly @weekly @daily @midnight
    @hourly). ``tz``: an IANA zone name, "" = UTC. ValueError saying what is wrong."""
    import datetime
    import zoneinfo

    from croniter import croniter  # (imported when a schedule is used: the CLI stays light)

    text = " ".join(expr.split())
    if not text:
        raise ValueError("empty cron expression")
    if "@reboot" in text.lower():
        raise ValueError("@reboot has no time: give a cron expression or @hourly, @daily...")
    n = len(text.split())
    if not text.startswith("@") and n not in (5, 6):
        raise ValueError(f"{expr!r} has {n} fields: a cron expression has 5 (minute hour "
                         "day-of-month month day-of-week) or 6 (seconds first)")
    try:
        zone: datetime.tzinfo = zoneinfo.ZoneInfo(tz) if tz else datetime.UTC
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r} (an IANA name such as Europe/Paris)") \
            from None
    try:
        return croniter(text, datetime.datetime.fromtimestamp(start, zone),
                        second_at_beginning=(n == 6))
    except (ValueError, KeyError, TypeError) as exc:  # (croniter's CroniterError is a ValueError)
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None


class Schedule(_Spec, frozen=True):
    """When a job runs by itself (beyond Swarm: Nomad's periodic jobs, Kubernetes' CronJob).
    At every time the cron expression gives, the leader starts a new run of the job (a new
    job iteration, as `service update --force` does, but not an update: nothing else
    changes), unless the policy is ``forbid`` and the previous run is still going: that run
    is recorded as skipped. The last ``history`` runs (started, completed and failed counts,
    state) are kept and shown by `service inspect`. A run missed while no leader was there
    is started once, late — unless it is later than ``starting_deadline``: then it is
    recorded as skipped (Kubernetes' startingDeadlineSeconds). Changing the schedule
    replaces no task and starts no run."""

    cron: Annotated[str, decl(
        "run the job at these times: a cron expression of 5 fields, or 6 with the seconds "
        "first, or @hourly, @daily, @weekly, @monthly, @yearly; empty = run once (on create "
        "and on each update)", flag="--schedule", cli="str", metavar="CRON",
        max_length=256)] = ""
    timezone: Annotated[str, decl("time zone of the schedule (IANA name); empty = UTC",
                                  flag="--schedule-tz", cli="str", metavar="ZONE",
                                  max_length=64)] = ""
    policy: Annotated[Literal["forbid", "allow", "replace"], decl(
        "a run due while the previous one still runs: forbid = skip it (recorded as "
        "skipped); allow = start it anyway, the previous one runs on; replace = stop the "
        "previous run's tasks and start it (the previous run is recorded as failed: "
        "Kubernetes' concurrencyPolicy Replace; needs cluster schema 12)",
        flag="--schedule-policy", cli="choice")] = "forbid"
    starting_deadline: Annotated[float, decl(
        "a run not started within this long after its time (missed while no leader was "
        "there) is recorded as skipped instead of started late; 0 = start it however late "
        "(Kubernetes' startingDeadlineSeconds; needs cluster schema 12)",
        flag="--schedule-starting-deadline", cli="duration", unit="seconds", ge=0,
        le=366 * 86400)] = 0.0
    history: Annotated[int, decl("scheduled runs kept in the service's history",
                                 flag="--schedule-history", cli="int", metavar="N", ge=1,
                                 le=MAX_SCHEDULE_HISTORY)] = 5

    def __post_init__(self) -> None:
        if self.timezone and not self.cron:
            raise SpecError("timezone", "is the time zone of a schedule: give --schedule too")
        if self.starting_deadline and not self.cron:
            raise SpecError("starting_deadline", "is a deadline of scheduled runs: give "
                            "--schedule too")
        if self.cron:
            try:
                times = parse_cron(self.cron, self.timezone)
            except ValueError as exc:
                field = "timezone" if "time zone" in str(exc) else "cron"
                raise SpecError(field, str(exc)) from None
            try:
                times.get_next(float)  # (from a fixed date: the same verdict everywhere)
            except ValueError:
                raise SpecError("cron", f"{self.cron!r} gives no time at all (a date that "
                                "does not exist, such as February 30?)") from None
