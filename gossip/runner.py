"""``python -m shoal.gossip``: run one gossip member and print membership events as JSON lines.

Owns a tiny command line for manual experiments, multi-process tests and benchmarks; the
agent embeds Memberlist directly and does not use this. It must not grow agent features.

Output (stdout, one JSON object per line, flushed)::

    {"event": "ready", "node": "n1", "addr": "127.0.0.1", "port": 40123, "t": 1700000000.1}
    {"event": "join", "node": "n1", "name": "n2", "state": "alive", "incarnation": 1, ...}
    {"event": "stats", "node": "n1", "stats": {...}}          (on SIGUSR1 and at exit)
    {"event": "exit", "node": "n1", "t": ...}

``node`` is the observer, ``name`` the member the event is about. SIGTERM or SIGINT leave the
cluster gracefully, then exit 0. Exit status 2 = bad arguments or key file, 3 = could not join.

The key file holds the cluster key as hex (32, 48 or 64 hex digits) or as raw 16/24/32 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .config import CONFIG_FIELDS, Config
from .errors import ConfigError, GossipError, JoinError
from .events import MemberEvent
from .memberlist import Memberlist
from .nodes import parse_address


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def read_key(path: str) -> bytes:
    """Read a key file: hex text or raw bytes; raise ConfigError if it is not a valid key."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("key_file", f"cannot read {path}: {exc.strerror}") from exc
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) not in (16, 24, 32):
        raise ConfigError("key_file", "key must be 16, 24 or 32 bytes (or twice that in hex)")
    return key


def _parse_override(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or name not in CONFIG_FIELDS:
        raise ConfigError(name or text, "expected FIELD=VALUE with a Config field name")
    default = getattr(Config(), name)
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return name, int(value)
    if isinstance(default, float):
        return name, float(value)
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.gossip", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="unique member name")
    p.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT to bind (port 0 = any)")
    p.add_argument("--advertise", default="", help="HOST[:PORT] to advertise")
    p.add_argument("--key-file", help="cluster key file (hex or raw bytes)")
    p.add_argument("--insecure", action="store_true", help="no encryption (tests only)")
    p.add_argument("--seed", action="append", default=[], help="HOST:PORT to join (repeatable)")
    p.add_argument("--join-timeout", type=float, default=10.0, help="keep retrying join this long")
    p.add_argument("--preset", choices=("lan", "local"), default="lan")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Config field, e.g. --set probe_interval=0.5")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata entry (repeatable)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    host, port = parse_address(args.bind, 0)
    fields: dict[str, object] = {"name": args.name, "bind_addr": host, "bind_port": port}
    if args.advertise:
        a_host, a_port = parse_address(args.advertise, 0)
        fields.update(advertise_addr=a_host, advertise_port=a_port)
    if args.insecure:
        fields["insecure_plaintext"] = True
    elif args.key_file:
        fields["secret_key"] = read_key(args.key_file)
    for item in args.set:
        key, value = _parse_override(item)
        fields[key] = value
    preset = Config.local if args.preset == "local" else Config.lan
    return preset(**fields).validate()


async def run(cfg: Config, seeds: list[str], meta: dict[str, Any], join_timeout: float) -> int:
    member = Memberlist(cfg, meta=meta)
    name = cfg.name

    def on_event(event: MemberEvent) -> None:
        _print({**event.to_dict(), "node": name, "t": time.time()})

    member.subscribe(on_event)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: _print({"event": "stats", "node": name, "stats": member.stats})
    )
    try:
        addr, port = await member.start()
        _print({"event": "ready", "node": name, "addr": addr, "port": port, "t": time.time()})
        if seeds:
            deadline = loop.time() + join_timeout
            while True:
                try:
                    await member.join(seeds)
                    break
                except JoinError as exc:
                    if loop.time() > deadline or stop.is_set():
                        _print({"event": "error", "node": name, "error": str(exc)})
                        return 3
                    await asyncio.sleep(0.2)
        await stop.wait()
        await member.leave()
        return 0
    finally:
        _print({"event": "stats", "node": name, "stats": member.stats})
        await member.shutdown()
        _print({"event": "exit", "node": name, "t": time.time()})
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        meta: dict[str, Any] = {}
        for item in args.meta:
            key, _, value = item.partition("=")
            meta[key] = value
    except (ConfigError, ValueError) as exc:
        print(f"shoal.gossip: {exc}", file=sys.stderr)
        return 2
    coro = run(cfg, args.seed, meta, args.join_timeout)
    try:
        if args.loop == "uvloop":
            try:
                import uvloop
            except ImportError:
                return asyncio.run(coro)
            return uvloop.run(coro)
        return asyncio.run(coro)
    except GossipError as exc:
        print(f"shoal.gossip: {exc}", file=sys.stderr)
        return 2
