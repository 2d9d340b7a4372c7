"""The events command: ``shoal events`` / ``GET /v1/events`` — who may read, and what.

Owns: checking the request (a manager, a well-formed ``since``/``until``/``filter``) and
handing the stream of records from this manager's event log (shoal.node.events) to the
API, which writes it as NDJSON or server-sent events. Managers only (``require_manager``):
workers keep no event log (see shoal.node.events).
Must not touch: how events are derived or retained (shoal.node.events), HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from shoal.node.context import NodeContext
from shoal.node.events import Bound, EventLog, parse_bound, parse_filters


class Events:
    def __init__(self, ctx: NodeContext, log: EventLog) -> None:
        self.ctx = ctx
        self.log = log

    def stream(self, since: str | None, until: str | None, filters: Iterable[str],
               follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """The records to send. Raises (before anything is streamed) NotManager,
        Unavailable or BadRequest; the iterator itself does not raise."""
        self.ctx.require_manager()
        start: Bound | None = parse_bound(since, "since") if since else None
        end: Bound | None = parse_bound(until, "until") if until else None
        wanted = parse_filters(filters)
        return self.log.stream(start, end, wanted, follow)
