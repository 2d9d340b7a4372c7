"""`shoal mqtt set|show|unset|command-key`: the cluster-wide MQTT bridge setting.

Owns: the mqtt command group's arguments and output (``add_parser``/``run``, hooked into
shoal.cli.main). Must not touch: the agent (only its API, /v1/mqtt), other commands.
Secrets never come from the command line: the password from standard input
(``--password-stdin``), the client key from a file. Errors: ``CliError`` for a flag the CLI
can judge; the API names the field otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shoal.cli.errors import CliError


def add_parser(sub: Any) -> None:
    m = sub.add_parser("mqtt", help="the cluster-wide MQTT bridge (every node publishes its "
                       "part to a broker)")
    msub = m.add_subparsers(dest="mqtt_cmd", required=True, parser_class=type(m))
    ms = msub.add_parser("set", help="set (or change) the broker every node's bridge uses; "
                         "an agent started with its own --mqtt-url keeps that one")
    ms.add_argument("url", metavar="mqtt[s]://[USER@]HOST[:PORT]")
    ms.add_argument("--password-stdin", action="store_true",
                    help="read USER's password from standard input (sealed in Raft); "
                    "without it the password set before is kept for the same user")
    ms.add_argument("--topic-prefix", default="", metavar="TOPIC",
                    help="topic prefix (default shoal/ + the cluster id's first 12 characters)")
    ms.add_argument("--ca", default="", metavar="FILE", help="PEM of the broker's CA (mqtts)")
    ms.add_argument("--client-cert", default="", metavar="FILE",
                    help="PEM client certificate for brokers that require one")
    ms.add_argument("--client-key", default="", metavar="FILE",
                    help="its PEM key (sealed in Raft)")
    ms.add_argument("--commands", action="store_true",
                    help="accept scale commands signed with the cluster's command key "
                    "(`shoal mqtt command-key`)")
    ms.add_argument("--rotate-command-key", action="store_true",
                    help="make a new command key (publishers need the new one)")
    show = msub.add_parser("show", help="the setting (never its secrets)")
    msub.add_parser("unset", help="remove the setting: every bridge following it stops")
    key = msub.add_parser("command-key", help="the HMAC key scale commands must be signed "
                          "with (root on a manager's socket, or a remote-API client)")
    for p in (ms, show, key):
        p.add_argument("--format", choices=["table", "json"], default="table")


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def set_body(args: argparse.Namespace, stdin: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": args.url, "topic_prefix": args.topic_prefix,
                            "commands": args.commands,
                            "rotate_command_key": args.rotate_command_key}
    if args.password_stdin:
        lines = (stdin or sys.stdin).read().splitlines()
        body["password"] = lines[0] if lines else ""
    if args.ca:
        body["ca"] = _read(args.ca, "--ca")
    if bool(args.client_cert) != bool(args.client_key):
        raise CliError("--client-cert and --client-key go together")
    if args.client_cert:
        body["client_cert"] = _read(args.client_cert, "--client-cert")
        body["client_key"] = _read(args.client_key, "--client-key")
    return body


def render(s: dict[str, Any]) -> str:
    if not s.get("set"):
        return "No cluster-wide MQTT setting (agents use their own --mqtt-* flags, if any)."
    rows = [("URL", s["url"]), ("Topics", s["topics"] + "/…"),
            ("Password", "set" if s["password"] else "none"),
            ("CA", "given" if s["ca"] else "system CAs"),
            ("Client certificate", "given" if s["client_cert"] else "none"),
            ("Commands", f"on (key version {s['command_key_version']})" if s["commands"]
             else "off"), ("Version", str(s["version"]))]
    return "\n".join(f"{k + ':':20}{v}" for k, v in rows)


def run(c: Any, args: argparse.Namespace, fmt: str, emit: Any) -> None:
    """``emit``: shoal.cli.main's output helper (passed in: no import cycle)."""
    sub = args.mqtt_cmd
    if sub == "set":
        emit(c.call("POST", "/v1/mqtt", set_body(args)), fmt, render)
    elif sub == "show":
        emit(c.call("GET", "/v1/mqtt"), fmt, render)
    elif sub == "unset":
        r = c.call("DELETE", "/v1/mqtt")
        print("MQTT setting removed." if r.get("removed") else "No MQTT setting was set.")
    elif sub == "command-key":
        r = c.call("GET", "/v1/mqtt/command-key")
        emit(r, fmt, lambda r: str(r["command_key"]))


__all__ = ["add_parser", "run", "set_body"]
