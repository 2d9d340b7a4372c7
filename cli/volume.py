"""`shoal volume create|ls|inspect|rm`: named volumes and their drivers.

Owns: the volume command group's arguments and output (``add_parser``/``run``, hooked into
shoal.cli.main). Must not touch: the agent (only its API, /v1/volumes), other commands.
Errors: ``CliError`` for a flag the CLI can judge; the API names the option otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from shoal.cli import output

Table = Callable[[list[list[str]], list[str]], str]


def add_parser(sub: Any) -> None:
    v = sub.add_parser("volume", help="manage named volumes (local, NFS, sshfs) and see "
                       "anonymous ones")
    vsub = v.add_subparsers(dest="volume_cmd", required=True, parser_class=type(v))
    vc = vsub.add_parser("create", help="create a volume whose driver and options hold "
                         "cluster-wide")
    vc.add_argument("name")
    vc.add_argument("-d", "--driver", default="local", choices=["local", "sshfs"],
                    help="local: a directory per node, or mount(2) with -o type=,o=,device= "
                    "(NFS); sshfs: FUSE over ssh, follows its task to any node")
    vc.add_argument("-o", "--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a driver option, e.g. sshcmd=user@host:/path, port=22, "
                    "IdentityFile-secret=SECRET, single-writer=true")
    vc.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
    vl = vsub.add_parser("ls", help="list volumes")
    output.add_list_flags(vl, "volume")
    vi = vsub.add_parser("inspect", help="show volume details (JSON)")
    vi.add_argument("names", nargs="+")
    vi.add_argument("--format", default="json", metavar="json|TEMPLATE",
                    help="json (default) or a template, e.g. '{{.Name}}'")
    vr = vsub.add_parser("rm", help="remove volumes (not while a service or task uses them)")
    vr.add_argument("names", nargs="+")
    vp = vsub.add_parser("prune", help="remove the anonymous volumes no task uses (this "
                         "node's); with -a the created ones no service or task uses too "
                         "(their records: a node's data directories stay) — Docker 23's")
    vp.add_argument("-f", "--force", action="store_true", help="do not ask to confirm")
    vp.add_argument("-a", "--all", action="store_true",
                    help="remove unused named (created) volumes too, not only anonymous ones")
    vp.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="remove only what matches (label=KEY[=VALUE], name, driver; "
                    "repeatable: one key's values are alternatives)")


def run(c: Any, args: argparse.Namespace, table: Table) -> None:
    sub = args.volume_cmd
    if sub == "create":
        from shoal.cli.flagvalues import parse_kv

        body = {"name": args.name, "driver": args.driver,
                "options": parse_kv(args.opt, "--opt"), "labels": parse_kv(args.label, "--label")}
        print(c.call("POST", "/v1/volumes", body)["name"])
    elif sub == "ls":
        output.show(c.call("GET", "/v1/volumes"), args, "volume")
    elif sub == "inspect":
        output.inspect(lambda n: c.call("GET", f"/v1/volumes/{quote(n, safe='')}"),
                       args.names, args.format)
    elif sub == "rm":
        def remove(n: str) -> None:
            c.call("DELETE", f"/v1/volumes/{quote(n, safe='')}")
            print(n)
        output.each(args.names, remove)
    elif sub == "prune":
        from shoal.cli.prune import prune

        filters = output.parse_filters(args.filter, "volume")
        prune(c, "/v1/volumes", "Volumes", args.force,
              lambda v: (args.all or bool(v.get("anonymous")))
              and output.matches(v, filters, "volume"),
              "all local volumes" if args.all else "anonymous local volumes")
