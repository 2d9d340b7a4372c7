"""Reading task logs: the size-rotated, per-line timestamped files the task's shim writes.

Owns: parsing and merging TASKDIR/{stdout,stderr}.log[.N]. Must not touch: the files themselves
(the shim, runtime/launcher.c, is their only writer).

Design. The shim (a C process per task that outlives the agent) reads the task's stdout and
stderr pipes and appends one record per line::

    2026-05-09T07:35:25.123456789Z F the line's text

``F`` = a complete line, ``P`` = part of a line (over 16 KiB, or no newline at exit; the next
records of that stream continue it). Before a record would push a file past
RuntimeConfig.log_max_bytes, the shim renames NAME.log -> NAME.log.1 -> ... NAME.log.(files-1)
(the oldest falls off) and opens a fresh NAME.log. A single writer that rotates by rename cannot
lose or tear a line, works while the agent is down, and readers never block it. The price: output
goes through a pipe, so a task writing faster than the disk is slowed down, as with Docker.

Readers open the files newest first and skip an inode already opened, so a rotation during a read
neither loses the newest lines nor duplicates older ones.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import heapq
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

STREAMS = ("stdout", "stderr")
_TS_LEN = 30


class LogLine(NamedTuple):
    """One line of a task's output."""

    ts: float  # when the shim read it (Unix time)
    stream: str  # "stdout" or "stderr"
    line: str  # the text, without the newline; "<RFC 3339 time> <text>" with timestamps=True


_SECONDS: dict[bytes, int] = {}


def parse_ts(raw: bytes) -> float:
    """Unix time of a record's ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ``."""
    head = raw[:19]
    secs = _SECONDS.get(head)
    if secs is None:
        t = head.decode()
        secs = calendar.timegm(
            (int(t[0:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), int(t[14:16]), int(t[17:19]))
        )
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        _SECONDS[head] = secs
    return secs + int(raw[20:29]) / 1e9


@dataclass
class _Rec:
    ts: float
    stamp: bytes  # the record's time text
    partial: bool
    text: bytes


def _parse(chunk: bytes) -> list[_Rec]:
    out = []
    for raw in chunk.split(b"\n"):
        if len(raw) < _TS_LEN + 2 or raw[_TS_LEN : _TS_LEN + 1] != b" ":
            continue  # not a record (cannot happen with the shim's files)
        try:
            ts = parse_ts(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        out.append(_Rec(ts, raw[:_TS_LEN], raw[_TS_LEN + 1 : _TS_LEN + 2] == b"P",
                        raw[_TS_LEN + 3 :]))  # fmt: skip
    return out


def _files_newest_first(taskdir: Path, stream: str) -> list[Path]:
    rotated = []
    for p in taskdir.glob(f"{stream}.log.*"):
        suffix = p.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [taskdir / f"{stream}.log"] + [p for _, p in sorted(rotated)]


@dataclass
class _Stream:
    """One stream's files: a snapshot of the records, then new records as they come."""

    taskdir: Path
    name: str
    fd: int | None = None  # the active file, for following
    ino: int = 0
    buf: bytes = b""
    pending: list[_Rec] = field(default_factory=list)  # partial records waiting for their end

    def snapshot(self, tail: int | None, since: float | None) -> list[_Rec]:
        """Records of the current files, oldest first. With ``tail``, older files are read only
        while fewer than ``tail`` records were found; with ``since``, files last written before
        it are skipped. Keeps the active file open at its end, for :meth:`poll`."""
        chunks: list[bytes] = []
        seen: set[tuple[int, int]] = set()
        count = 0
        for i, path in enumerate(_files_newest_first(self.taskdir, self.name)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in seen or (i > 0 and since is not None and st.st_mtime < since):
                os.close(fd)
                continue
            seen.add(key)
            data = _read_all(fd)
            if i == 0:
                cut = data.rfind(b"\n") + 1
                data, self.buf = data[:cut], data[cut:]
                self.fd, self.ino = fd, st.st_ino
            else:
                os.close(fd)
            chunks.append(data)
            count += data.count(b"\n")
            if tail is not None and count >= tail:
                break
        return _parse(b"".join(reversed(chunks)))

    def poll(self) -> list[_Rec]:
        """Records appended since the last call, following a rotation."""
        out: list[_Rec] = []
        while True:
            if self.fd is None:
                try:
                    self.fd = os.open(self.taskdir / f"{self.name}.log", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return out
                self.ino = os.fstat(self.fd).st_ino
            data = self.buf + _read_all(self.fd)
            cut = data.rfind(b"\n") + 1
            out += _parse(data[:cut])
            self.buf = data[cut:]
            try:
                current = os.stat(self.taskdir / f"{self.name}.log").st_ino
            except OSError:
                return out
            if current == self.ino:
                return out
            # rotated: what is left in the old file was read above; continue with the new one
            os.close(self.fd)
            self.fd, self.buf = None, b""

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def lines(self, recs: list[_Rec], final: bool) -> list[tuple[float, bytes, bytes]]:
        """Join partial records into lines: (ts, stamp, text). An unfinished line is kept for
        the next call unless ``final``."""
        out = []
        for rec in recs:
            if rec.partial:
                self.pending.append(rec)
                continue
            if self.pending:
                first = self.pending[0]
                text = b"".join(r.text for r in self.pending) + rec.text
                out.append((first.ts, first.stamp, text))
                self.pending = []
            else:
                out.append((rec.ts, rec.stamp, rec.text))
        if final and self.pending:
            first = self.pending[0]
            out.append((first.ts, first.stamp, b"".join(r.text for r in self.pending)))
            self.pending = []
        return out


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _merge(
    per_stream: dict[str, list[tuple[float, bytes, bytes]]],
    since: float | None,
    tail: int | None,
    timestamps: bool,
) -> list[LogLine]:
    tagged = [[(ts, name, stamp, text) for ts, stamp, text in lines]
              for name, lines in per_stream.items()]  # fmt: skip
    merged = heapq.merge(*tagged, key=lambda item: item[0])
    items = [m for m in merged if since is None or m[0] >= since]
    if tail is not None:
        items = items[-tail:] if tail > 0 else []
    out = []
    for ts, name, stamp, text in items:
        line = text.decode(errors="replace")
        if timestamps:
            line = f"{stamp.decode()} {line}"
        out.append(LogLine(ts, name, line))
    return out


def read_logs(
    taskdir: Path,
    tail: int | None = None,
    since: float | None = None,
    timestamps: bool = False,
) -> list[LogLine]:
    """The task's output lines, both streams merged in time order: the last ``tail`` lines (None
    = all kept), only those logged at or after ``since`` (Unix time), each prefixed with its
    RFC 3339 time when ``timestamps``."""
    per_stream = {}
    for name in STREAMS:
        s = _Stream(taskdir, name)
        try:
            per_stream[name] = s.lines(s.snapshot(tail, since), final=True)
        finally:
            s.close()
    return _merge(per_stream, since, tail, timestamps)


async def follow_logs(
    taskdir: Path,
    running: Callable[[], bool],
    tail: int | None = None,
    since: float | None = None,
    timestamps: bool = False,
    interval: float = 0.1,
) -> AsyncIterator[LogLine]:
    """Like :func:`read_logs`, then every new line as it is written (checked each ``interval``
    seconds), until ``running()`` is false and everything written has been yielded."""
    streams = [_Stream(taskdir, name) for name in STREAMS]
    try:
        first = {s.name: s.lines(s.snapshot(tail, since), final=False) for s in streams}
        for line in _merge(first, since, tail, timestamps):
            yield line
        while True:
            last = not running()  # decided before reading: a line written before exit is seen
            batch = {s.name: s.lines(s.poll(), final=last) for s in streams}
            for line in _merge(batch, since, None, timestamps):
                yield line
            if last:
                return
            await asyncio.sleep(interval)
    finally:
        for s in streams:
            with contextlib.suppress(OSError):
                s.close()
