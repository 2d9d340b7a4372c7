"""`shoal network create|ls|inspect|rm`: user-defined overlay networks.

Owns: the network command group's arguments and output (``add_parser``/``run``, hooked into
shoal.cli.main). Must not touch: the agent (only its API, /v1/networks), other commands.
Errors: ``CliError`` for a flag the CLI can judge; the API names the field otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from shoal.cli import output


def add_parser(sub: Any) -> None:
    n = sub.add_parser("network", help="manage user-defined networks (VXLAN overlays)")
    nsub = n.add_subparsers(dest="network_cmd", required=True, parser_class=type(n))
    nc = nsub.add_parser("create", help="create a network every node can attach tasks to")
    nc.add_argument("name")
    nc.add_argument("-d", "--driver", default="overlay", choices=["overlay"],
                    help="overlay: a VXLAN network across every node (default)")
    nc.add_argument("--subnet", default="", metavar="CIDR",
                    help="the network's subnet (default: the next /24 of the address pool)")
    nc.add_argument("--gateway", default="", metavar="IP",
                    help="the gateway address in the subnet (default: its first)")
    nc.add_argument("--internal", action="store_true",
                    help="no route out of the network (its tasks reach only each other)")
    nc.add_argument("--attachable", action="store_true", help="recorded (Swarm parity)")
    nc.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
    nl = nsub.add_parser("ls", help="list networks")
    output.add_list_flags(nl, "network")
    ni = nsub.add_parser("inspect", help="show network details (JSON)")
    ni.add_argument("names", nargs="+")
    ni.add_argument("--format", default="json", metavar="json|TEMPLATE",
                    help="json (default) or a template, e.g. '{{.Name}}'")
    nr = nsub.add_parser("rm", help="remove networks (not while a service or task uses them)")
    nr.add_argument("names", nargs="+")
    npr = nsub.add_parser("prune", help="remove the networks no service or task uses")
    npr.add_argument("-f", "--force", action="store_true", help="do not ask to confirm")


Table = Callable[[list[list[str]], list[str]], str]
Emit = Callable[[Any, str, Callable[[Any], str]], None]


def render(nets: list[dict[str, Any]], table: Table) -> str:
    rows = [[n["id"][:12], n["name"], n["driver"], n["subnet"], n["gateway"], str(n["vni"]),
             "yes" if n["internal"] else "", str(len(n.get("services", [])))] for n in nets]
    return table(rows, ["NETWORK ID", "NAME", "DRIVER", "SUBNET", "GATEWAY", "VNI",
                        "INTERNAL", "SERVICES"])


def run(c: Any, args: argparse.Namespace, fmt: str, emit: Emit, table: Table) -> None:
    """``emit``/``table``: shoal.cli.main's output helpers (passed in: no import cycle)."""
    sub = args.network_cmd
    if sub == "create":
        from shoal.cli.flagvalues import parse_kv

        body: dict[str, Any] = {"name": args.name, "driver": args.driver,
                                "labels": parse_kv(args.label, "--label"),
                                "internal": args.internal, "attachable": args.attachable}
        if args.subnet:
            body["subnet"] = args.subnet
        if args.gateway:
            body["gateway"] = args.gateway
        print(c.call("POST", "/v1/networks", body)["id"])
    elif sub == "ls":
        output.show(c.call("GET", "/v1/networks"), args, "network")
    elif sub == "inspect":
        output.inspect(lambda n: c.call("GET", f"/v1/networks/{quote(n, safe='')}"),
                       args.names, args.format)
    elif sub == "rm":
        def remove(n: str) -> None:
            c.call("DELETE", f"/v1/networks/{quote(n, safe='')}")
            print(n)
        output.each(args.names, remove)
    elif sub == "prune":
        from shoal.cli.prune import prune

        prune(c, "/v1/networks", "Networks", args.force)
