"""`shoal network prune` and `shoal volume prune` (docker's): remove the records no service
(nor live task) uses, after a confirmation unless ``-f``.

Owns: the two commands' shared confirmation (`builder prune`'s too), selection and output.
Must not touch: the agent (only its list and remove routes: a removal the manager refuses,
because something started to use the object meanwhile, is reported and skipped), other
commands.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from shoal.cli.errors import CliError
from shoal.cli.output import unused


def confirmed(what: str, force: bool, warning: str = "") -> bool:
    """docker's question (on stderr), answered on stdin; ``force`` skips it. ``warning``:
    what it removes, said whole (else ``what`` not used by a service or task)."""
    if force:
        return True
    said = warning or f"{what} not used by at least one service or task"
    print(f"WARNING! This will remove {said}.\n"
          "Are you sure you want to continue? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def prune(c: Any, path: str, title: str, force: bool,
          chosen: Callable[[dict[str, Any]], bool] = lambda obj: True,
          what: str = "") -> list[str]:
    """Remove every object of ``path`` (/v1/networks, /v1/volumes) with no user that
    ``chosen`` keeps (``what`` names them in the question: all TITLE by default); print
    docker's ``Deleted TITLE:`` list; the names removed."""
    if not confirmed(what or f"all {title.lower()}", force):
        return []
    removed: list[str] = []
    for obj in c.call("GET", path):
        if not unused(obj) or not chosen(obj):
            continue
        try:
            c.call("DELETE", f"{path}/{quote(obj['name'], safe='')}")
        except CliError as exc:  # (in use since the list: kept, and said)
            print(f"{obj['name']}: {exc}", file=sys.stderr)
            continue
        removed.append(obj["name"])
    if removed:
        print(f"Deleted {title}:\n" + "\n".join(removed))
    return removed
