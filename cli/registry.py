"""`shoal registry login/logout`, `shoal image pull`, and the registry flags of `service
create/update` (``--with-registry-auth``, ``--resolve-image``).

Owns: these commands' arguments and output. The password is read from stdin
(``--password-stdin``) or a prompt without echo, sent once to the manager (which checks it
against the registry and keeps it sealed), and never printed. Must not touch: other command
groups (cli/main.py hooks these in with a few lines).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Protocol

from shoal.cli.errors import CliError


class _Client(Protocol):
    def call(self, method: str, path: str, body: Any = None) -> Any: ...


def add_parser(sub: Any) -> None:
    r = sub.add_parser("registry", help="credentials for image registries")
    rsub = r.add_subparsers(dest="registry_cmd", required=True, parser_class=type(r))
    li = rsub.add_parser("login", help="check and keep credentials for a registry (sealed "
                         "in the cluster; services use them with --with-registry-auth)")
    li.add_argument("server", metavar="HOST[:PORT]")
    li.add_argument("-u", "--username", default="")
    li.add_argument("--password-stdin", action="store_true",
                    help="read the password from stdin (else: prompt without echo)")
    lo = rsub.add_parser("logout", help="forget a registry's credentials")
    lo.add_argument("server", metavar="HOST[:PORT]")


def add_image_pull(isub: Any) -> None:
    ip = isub.add_parser("pull", help="pull an image from its registry into this node "
                         "(layers from peers first)")
    ip.add_argument("ref", metavar="HOST[:PORT]/NAME[:TAG][@DIGEST]")


def add_service_flags(parser: argparse.ArgumentParser, update: bool) -> None:
    parser.add_argument("--with-registry-auth", action="store_true", default=None,
                        help="nodes pull the image with the credentials of `shoal registry "
                        "login` for its registry")
    parser.add_argument("--resolve-image", choices=["always", "changed", "never"],
                        default=None, help="pin the image tag to the registry's digest "
                        f"(default: {'changed' if update else 'always'})")


def service_body(body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A create/update request body with the registry flags applied."""
    if getattr(args, "with_registry_auth", None):
        body["spec"].setdefault("task", {}).setdefault("container", {})["registry_auth"] = True
    if getattr(args, "resolve_image", None):
        body["resolve_image"] = args.resolve_image
    return body


def print_warnings(reply: Any) -> None:
    for w in (reply.get("warnings") or []) if isinstance(reply, dict) else []:
        print(f"warning: {w}", file=sys.stderr)


def run(c: _Client, args: argparse.Namespace, fmt: str) -> None:
    if args.registry_cmd == "login":
        user = args.username or input("Username: ").strip()
        if args.password_stdin:
            password = sys.stdin.read().rstrip("\r\n")
        else:
            import getpass

            password = getpass.getpass("Password: ")
        if not user or not password:
            raise CliError("a username and a password are required")
        r = c.call("POST", "/v1/registry/login",
                   {"server": args.server, "username": user, "password": password})
        print(f"Login Succeeded: credentials for {r['server']} stored in the cluster")
    elif args.registry_cmd == "logout":
        import urllib.parse

        r = c.call("DELETE", f"/v1/registry/login/{urllib.parse.quote(args.server, safe='')}")
        print(f"Removed the credentials for {r['server']}")


def run_pull(c: _Client, args: argparse.Namespace, fmt: str) -> None:
    img = c.call("POST", "/v1/images/pull", {"ref": args.ref})
    print(f"Pulled {args.ref} ({img['id'][:19]})")


__all__ = ["add_image_pull", "add_parser", "add_service_flags", "print_warnings", "run",
           "run_pull", "service_body"]
