"""`shoal builder prune` (docker's): remove the build cache of the node the CLI talks to.

Owns: the ``builder`` command group's flags, its confirmation and its output (docker's
``Deleted build cache objects:`` list and ``Total reclaimed space:``). Must not touch: the
choice of what goes (the agent's, shoal.runtime.buildcache behind ``POST
/v1/builder/prune``: filters are checked there), other command groups.
"""

from __future__ import annotations

import argparse
from typing import Any

from shoal.cli import output
from shoal.cli.prune import confirmed


def add_parser(sub: Any) -> None:
    b = sub.add_parser("builder", help="manage this node's build cache")
    bsub = b.add_subparsers(dest="builder_cmd", required=True, parser_class=type(b))
    p = bsub.add_parser("prune", help="remove this node's build cache (only the dangling "
                        "records unless -a)")
    p.add_argument("-a", "--all", action="store_true",
                   help="every record no running build uses: also the steps of the builds "
                   "that made the images this node keeps")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="until=DURATION|TIMESTAMP (only what was last used before, e.g. "
                   "until=24h), id=ID (a record's id or its prefix, or a cache mount's id=); "
                   "repeatable")
    p.add_argument("--keep-storage", default="", metavar="SIZE",
                   help="keep this much build cache (e.g. 2G): the least recently used goes "
                   "first, until the cache is no bigger")


def run(c: Any, args: argparse.Namespace) -> None:
    from shoal.cli.flagvalues import parse_size

    keep = parse_size(args.keep_storage, "--keep-storage")
    if not confirmed("", args.force, warning="all build cache" if args.all
                     else "all dangling build cache"):
        return
    r = c.call("POST", "/v1/builder/prune",
               {"all": bool(args.all), "filters": list(args.filter), "keep_storage": keep})
    if r["deleted"]:
        print("Deleted build cache objects:\n" + "\n".join(r["deleted"]) + "\n")
    print(f"Total reclaimed space: {output.decimal_size(r['reclaimed'])}")


__all__ = ["add_parser", "run"]
