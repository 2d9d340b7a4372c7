"""`shoal swarm update --autolock`, `shoal unlock`, `shoal unlock-key`, `shoal ca rotate`.

Owns: the arguments and output of the manager-key-safety commands (``add_parser`` /
``add_ca_parser`` / ``run`` / ``run_ca_rotate``, hooked into shoal.cli.main), and
``init --autolock``'s second step (``enable_autolock``). Must not touch: the agent (only
its API: /v1/swarm/update, /v1/swarm/unlock, /v1/swarm/unlock-key, /v1/swarm/rotate-key,
/v1/swarm/rotate-raft-key, /v1/ca/rotate, /v1/ca).
Errors: ``CliError`` for what the CLI can judge; the API names the field otherwise.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from shoal.cli.errors import CliError

COMMANDS = ("swarm", "unlock", "unlock-key")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def duration(text: str) -> float:
    """``90d``, ``2160h``, ``45m``, ``300s`` or plain seconds (Docker's --cert-expiry)."""
    m = _DURATION_RE.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError("expected a duration like 90d, 2160h, 45m or 300s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def add_parser(sub: Any) -> None:
    sw = sub.add_parser("swarm", help="cluster settings: autolock, task history")
    swsub = sw.add_subparsers(dest="swarm_cmd", required=True, parser_class=type(sw))
    su = swsub.add_parser("update", help="change cluster settings")
    su.add_argument("--autolock", type=_bool, default=None, metavar="true|false",
                    help="encrypt the managers' keys at rest under an unlock key (printed "
                         "once): a restarted manager then waits for `shoal unlock`")
    su.add_argument("--task-history-limit", type=int, default=None, metavar="N",
                    help="dead tasks kept per slot (`service ps` shows them; default 3; "
                         "Docker's default is 5)")
    rk = swsub.add_parser("rotate-key", help="new managers' keys: the sealing key (secrets, "
                          "the CA key and join tokens re-sealed) and the Raft secret (every "
                          "manager switches over without downtime); removed or demoted "
                          "managers can read neither the log nor what is sealed from then on")
    which = rk.add_mutually_exclusive_group()
    which.add_argument("--sealing-only", action="store_true",
                       help="only the managers' sealing key")
    which.add_argument("--raft-only", action="store_true", help="only the Raft secret")
    rk.add_argument("-d", "--detach", action="store_true",
                    help="do not wait for every manager to switch to the new Raft secret")
    rk.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                    help="how long to wait for the Raft secret rotation (default 120)")
    sub.add_parser("unlock", help="unlock a manager restarted with autolock (reads the key "
                                  "from stdin or a prompt)")
    uk = sub.add_parser("unlock-key", help="show (or rotate) the cluster's unlock key")
    uk.add_argument("-q", "--quiet", action="store_true", help="print only the key")
    uk.add_argument("--rotate", action="store_true",
                    help="a new key: every manager re-wraps its keys, the old key stops "
                         "working (keep it a while for managers that are down now)")


def add_ca_parser(casub: Any) -> None:
    r = casub.add_parser("rotate", help="a new root CA: every node is re-issued a "
                                        "certificate, then the old root is no longer trusted")
    r.add_argument("--cert-expiry", type=duration, default=None, metavar="DURATION",
                   help="lifetime of node certificates from now on (e.g. 90d, 2160h)")
    r.add_argument("-d", "--detach", action="store_true", help="do not wait for the end")
    r.add_argument("--timeout", type=float, default=300.0, help=argparse.SUPPRESS)


def _print_key(key: str, quiet: bool) -> None:
    if quiet:
        print(key)
        return
    print("To unlock a manager restarted with autolock, run `shoal unlock` on it and give "
          "this key:\n")
    print(f"    {key}\n")
    print("Keep it safe (a password manager): without it a restarted manager cannot rejoin.")


def enable_autolock(c: Any) -> None:
    """`init --autolock`: turn autolock on right after the cluster exists."""
    r = c.call("POST", "/v1/swarm/update", {"autolock": True})
    _print_key(str(r["unlock_key"]), False)


def _read_key() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Enter unlock key: ")
    return sys.stdin.readline().strip()


def run(c: Any, args: argparse.Namespace) -> None:
    if args.cmd == "swarm" and args.swarm_cmd == "rotate-key":
        if not args.raft_only:
            r = c.call("POST", "/v1/swarm/rotate-key")
            print(f"Rotated the managers' key ({r['key_id']}): {r['secrets']} secret(s), the "
                  "CA key and the join tokens re-sealed.")
        if not args.sealing_only:
            _rotate_raft_secret(c, args)
    elif args.cmd == "swarm":
        if args.autolock is None and args.task_history_limit is None:
            raise CliError("nothing to update: give --autolock=true|false or "
                           "--task-history-limit N")
        r = c.call("POST", "/v1/swarm/update", {"autolock": args.autolock,
                                                "task_history_limit": args.task_history_limit})
        if args.task_history_limit is not None:
            print(f"Task history limit: {r.get('task_history_limit')} per slot.")
        if r.get("unlock_key"):
            print("Autolock is on.")
            _print_key(str(r["unlock_key"]), False)
        elif args.autolock is not None:
            print(f"Autolock is {'on' if r['autolock'] else 'off'}.")
    elif args.cmd == "unlock":
        key = _read_key()
        if not key:
            raise CliError("no unlock key given", "key")
        c.call("POST", "/v1/swarm/unlock", {"key": key})
        print("This node is unlocked and rejoins the cluster.")
    elif args.cmd == "unlock-key":
        r = c.call("POST" if args.rotate else "GET", "/v1/swarm/unlock-key")
        if args.rotate and not args.quiet:
            print("Rotated the unlock key: every running manager re-wraps its keys with it.")
        _print_key(str(r["unlock_key"]), args.quiet)


def _follow(poll: Callable[[], dict[str, Any]],
            check: Callable[[dict[str, Any]], str | None],
            timeout: float, interval: float, late: str) -> None:
    """Wait for a rotation to end: ``poll`` its status every ``interval`` s; ``check`` a
    status returns None when the rotation is done, else its progress line (printed when it
    changes), and raises CliError when another rotation replaced this one. CliError
    ``late`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        line = check(poll())
        if line is None:
            return
        if line != last:
            print(line, flush=True)
            last = line
        if time.monotonic() > deadline:
            raise CliError(late)
        time.sleep(interval)


def _rotate_raft_secret(c: Any, args: argparse.Namespace) -> None:
    key_id = str(c.call("POST", "/v1/swarm/rotate-raft-key")["key_id"])
    if args.detach:
        print(f"Raft secret rotation started ({key_id}); the managers switch over in seconds "
              "(progress: GET /v1/swarm/rotate-raft-key).")
        return

    def check(rot: dict[str, Any]) -> str | None:
        if not rot.get("phase") and rot.get("key_id") == key_id:
            return None
        if rot.get("phase") and rot.get("next_key_id") != key_id:
            raise CliError("another Raft secret rotation replaced this one")
        n = rot.get("managers", 0)
        return (f"{rot.get('phase') or 'starting'}: {rot.get('accepting', 0)}/{n} managers "
                f"accept the new Raft secret, {rot.get('switched', 0)}/{n} send with it")

    _follow(lambda: c.call("GET", "/v1/swarm/rotate-raft-key"), check, args.timeout, 0.3,
            f"the Raft secret rotation has not finished after {args.timeout:g}s (it goes on; "
            "a manager that is not down but does not answer holds it up)")
    print(f"Rotated the Raft secret ({key_id}): every manager sends with it; the old "
          "one is no longer accepted.")


def run_ca_rotate(c: Any, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    if args.cert_expiry is not None:
        body["cert_expiry"] = args.cert_expiry
    r = c.call("POST", "/v1/ca/rotate", body)
    digest = str(r["digest"])
    if args.detach:
        print(f"CA rotation started: new root {digest[:12]} (follow with `shoal ca info`).")
        return

    def check(rot: dict[str, Any]) -> str | None:
        if not rot.get("phase") and rot.get("digest") == digest:
            return None
        if rot.get("next_digest") not in ("", digest):
            raise CliError("another CA rotation replaced this one")
        return (f"{rot.get('phase') or 'starting'}: {rot.get('trusting', 0)}/"
                f"{rot.get('nodes', 0)} nodes trust the new root, {rot.get('reissued', 0)}/"
                f"{rot.get('nodes', 0)} re-issued")

    _follow(lambda: c.call("GET", "/v1/ca").get("rotation", {}), check, args.timeout, 0.5,
            f"the CA rotation has not finished after {args.timeout:g}s (it goes on: follow "
            "with `shoal ca info`; a node that is not down but does not answer holds it up)")
    print(f"CA rotation done: every node holds a certificate of root {digest[:12]}; "
          "the old root is no longer trusted.")


__all__ = ["COMMANDS", "add_ca_parser", "add_parser", "duration", "enable_autolock", "run",
           "run_ca_rotate"]
