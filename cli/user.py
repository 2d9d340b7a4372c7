"""`shoal user add|ls|update|rm|token`: the users of the API and the dashboard.

Owns: the user commands (reading a password from stdin, never from an argument or a prompt
echo; printing a new API token once). They call ``/v1/users`` (shoal.node.users), which only
an admin may call — on the unix socket the caller (root on the node) is an admin, which is how
the first admin is made. Must not touch: hashing and roles (the manager's).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Protocol
from urllib.parse import quote

from shoal.cli import output
from shoal.cli.errors import CliError

ROLES = ("viewer", "operator", "admin")


class Client(Protocol):
    """What these commands need of shoal.cli.main.Client (not imported: main imports us)."""

    def call(self, method: str, path: str, body: Any = None) -> Any: ...


def add_parser(sub: Any) -> None:
    u = sub.add_parser("user", help="users and roles of the API and the dashboard")
    usub = u.add_subparsers(dest="user_cmd", required=True, parser_class=type(u))
    a = usub.add_parser("add", help="add a user (password read from stdin)")
    a.add_argument("name")
    a.add_argument("--role", choices=ROLES, required=True,
                   help="viewer: read only; operator: services, nodes, secrets; admin: all")
    a.add_argument("--password-stdin", action="store_true", required=True,
                   help="read the password from stdin (first line)")
    ls = usub.add_parser("ls", help="list users (never a password or token)")
    output.add_list_flags(ls, "user")
    up = usub.add_parser("update", help="change a user's role and/or password")
    up.add_argument("name")
    up.add_argument("--role", choices=ROLES)
    up.add_argument("--password-stdin", action="store_true",
                    help="read the new password from stdin (first line)")
    rm = usub.add_parser("rm", help="remove users (and revoke their client certificates)")
    rm.add_argument("names", nargs="+")
    tk = usub.add_parser("token", help="a new API token for a user (the old one stops "
                         "working); printed once")
    tk.add_argument("name")


def _password() -> str:
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CliError("no password on stdin (pipe it in: `... --password-stdin < FILE`)",
                       "password")
    return line


def run(c: Client, args: argparse.Namespace, fmt: str) -> None:

    cmd = args.user_cmd
    if cmd == "add":
        u = c.call("POST", "/v1/users", {"name": args.name, "role": args.role,
                                         "password": _password()})
        print(f"User {u['name']!r} added ({u['role']}).")
    elif cmd == "ls":
        output.show(c.call("GET", "/v1/users"), args, "user")
    elif cmd == "update":
        body: dict[str, Any] = {}
        if args.role:
            body["role"] = args.role
        if args.password_stdin:
            body["password"] = _password()
        if not body:
            raise CliError("give --role and/or --password-stdin", "role")
        u = c.call("POST", f"/v1/users/{quote(args.name, safe='')}", body)
        print(f"User {u['name']!r} updated ({u['role']}).")
    elif cmd == "rm":
        def remove(name: str) -> None:
            c.call("DELETE", f"/v1/users/{quote(name, safe='')}")
            print(name)
        output.each(args.names, remove)
    elif cmd == "token":
        r = c.call("POST", f"/v1/users/{quote(args.name, safe='')}/token")
        print(r["token"])
