"""Follower side of append-entries: delete only from the first conflict, as Raft says.

Owns: how an incoming append-entries message is reduced to what pysyncobj may safely do
with it (``trim``), and the verified end past which a follower must not commit.

Why: pysyncobj's follower, once ``prevLogIdx`` matches, deletes *every* entry after it and
appends the message's entries — even when they are the same entries it already holds.
Raft deletes only from the first entry whose term differs. The difference matters when a
message covers less than the follower's log: an older batch resent after the leader moved
its next index back, an empty heartbeat at an earlier index, or a batch whose appends fail
on a full disk after the delete. The follower's log then shrinks below what it already
acknowledged, while the leader keeps its match index (it only grows) and may count the
follower for a commit it no longer holds — an acknowledged write that a later leader (this
follower) does not have (found by the fault suite, docs/reliability.md). pysyncobj also
sets a follower's commit index from its whole log length, which is only safe because of
the unconditional truncation.

What ``trim`` returns for a message whose ``prevLogIdx`` matches the local log:

* entries beyond the local log or conflicting with it: the same message starting at the
  first new/conflicting entry (``prevLogIdx`` moved forward): pysyncobj deletes from the
  conflict only — which is correct, and also where it reverses membership changes;
* every entry already held and the local log ending exactly there: an empty message at the
  local end (nothing deleted, the answer is the same);
* every entry already held and the local log going on beyond them: a heartbeat without
  ``prevLogIdx`` (pysyncobj deletes nothing) plus the *verified* end, the last index the
  message proved: the caller answers "I hold up to the verified end" itself and keeps the
  commit index at or below it (the tail beyond is unverified, possibly another term's).

Messages whose ``prevLogIdx`` does not match (pysyncobj answers "reset" and deletes
nothing), from an older term (ignored), or with non-contiguous entries are left alone.

Must not touch: pysyncobj's state — this module is pure (tests/test_raft_append_trim.py);
shoal.raft.store applies it on the tick thread.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

# (command, index, term): pysyncobj's log entry
Entry = tuple[Any, int, int]


def trim(message: dict[str, Any], first: int, last: int,
         term_at: Callable[[int], int]) -> tuple[dict[str, Any], int | None]:
    """Reduce an append-entries ``message`` for a follower whose log holds indexes
    ``first``..``last`` (``term_at(i)`` the term of entry ``i`` in that range).

    Returns ``(message for pysyncobj, verified)``; ``verified`` is None when pysyncobj may
    handle the returned message alone, else the last index the message verified (the
    caller answers and bounds the commit index)."""
    prev = message["prevLogIdx"]
    if not first <= prev <= last or term_at(prev) != message["prevLogTerm"]:
        return message, None
    entries: list[Entry] = list(message.get("entries") or [])
    if any(e[1] != prev + 1 + i for i, e in enumerate(entries)):
        return message, None  # not pysyncobj's shape: leave it to pysyncobj
    held = 0
    while held < len(entries):
        _, idx, term = entries[held]
        if idx > last or term_at(idx) != term:
            break
        held += 1
    if held < len(entries):  # new entries from ``held`` on (beyond the log, or a conflict)
        start_term = entries[held - 1][2] if held else message["prevLogTerm"]
        return {**message, "prevLogIdx": entries[held][1] - 1, "prevLogTerm": start_term,
                "entries": entries[held:]}, None
    end = entries[-1][1] if entries else prev
    if end == last:
        return {**message, "prevLogIdx": last, "prevLogTerm": term_at(last),
                "entries": []}, None
    heartbeat = {k: v for k, v in message.items()
                 if k not in ("prevLogIdx", "prevLogTerm", "entries")}
    return heartbeat, end


class Transmissions:
    """Reassembles pysyncobj's chunked single-entry messages (an entry larger than a
    batch is sent as ``transmission`` start/process/finish) so the finished entry can be
    trimmed like any other. pysyncobj keeps its own copy; this one only reads.

    pysyncobj's sender (0.3.x ``__sendAppendEntries``) labels a chunk "finish" when it
    reaches the end of the *command*, not of the pickled entry, which is ~50 bytes longer:
    when a batch boundary falls in those bytes, the last chunk but one is labelled "finish"
    and the rest follows as a second "finish". pysyncobj's receiver then unpickles a
    truncated entry, raises on its tick thread, never answers, and the leader sends the same
    entry again, for ever, and so does every later leader (a 100-worker lab's scale to 1,000
    tasks did this: Raft term 1 → 264 in five minutes, no write committed). A "finish" whose
    data does not unpickle for want of bytes is therefore treated as "process" and the entry
    completed by the next chunk."""

    def __init__(self) -> None:
        self._parts: dict[Any, bytes] = {}

    def entry_message(self, node: Any, message: dict[str, Any]) -> dict[str, Any] | None:
        """The whole message once ``message`` finishes a transmission (its entry in
        ``entries``); None to pass ``message`` to pysyncobj unchanged; or, for a "finish"
        that came early (see the class), ``message`` relabelled "process" for pysyncobj."""
        kind, data = message.get("transmission"), message.get("data", b"")
        if kind == "start":
            self._parts[node] = bytes(data)
            return None
        if kind == "process":
            self._parts[node] = self._parts.get(node, b"") + bytes(data)
            return None
        if kind != "finish":
            return None
        blob = self._parts.pop(node, b"") + bytes(data)
        try:
            entry = pickle.loads(blob)  # pysyncobj's own framing (authenticated)
        except (EOFError, pickle.UnpicklingError) as exc:
            # a pickle (it starts with PROTO) that ends too soon: the rest is still to come
            if blob[:1] == b"\x80" and (isinstance(exc, EOFError) or "truncated" in str(exc)):
                return self._early(node, blob, message)
            return None  # pysyncobj decides (and fails) as it would have
        except Exception:
            return None  # pysyncobj decides (and fails) as it would have
        whole = {k: v for k, v in message.items() if k not in ("transmission", "data")}
        whole["entries"] = [entry]
        return whole

    def _early(self, node: Any, blob: bytes, message: dict[str, Any]) -> dict[str, Any]:
        self._parts[node] = blob  # the rest comes as the next "finish"
        return {**message, "transmission": "process"}


__all__ = ["Transmissions", "trim"]
