"""`shoal service create --spec FILE.yaml`: a service spec read from a YAML (or JSON) file.

Owns: reading the file (``-`` = stdin), checking it against the spec's declarations
(shoal.raft.validate: the same checks the managers run, so a bad file gets one line naming
the field, ``FILE: task.sidecars[0].image: ...``, before anything is sent), and laying the
command line's flags over it (a flag given wins over the file: ``--name``, ``--replicas``,
``--env``...). The file holds the API's nested spec (docs/api.md's spec reference): the only
way besides the API to declare what has no flag, such as a pod's ``task.sidecars`` and
``task.init_containers``. Times are numbers of seconds, sizes numbers of bytes (as in the
API). Must not touch: the cluster (run_service in cli/main.py sends the result).
"""

from __future__ import annotations

import sys
from typing import Any

from shoal.cli.errors import CliError


def load(path: str) -> dict[str, Any]:
    """The spec in ``path`` (YAML; JSON is YAML too), or CliError naming the file and, for a
    bad field, its path in the spec."""
    from shoal.cli.compose_env import ComposeError, parse_yaml

    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the spec file {path}: {exc}") from None
    try:
        doc = parse_yaml(text, path)
    except ComposeError as exc:
        raise CliError(str(exc).replace("a Compose file is a mapping (services: ...)",
                                        "a spec file is a mapping (name:, task: ...)")) from None
    return doc


def overlay(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``base`` with what the flags set laid over it (nested mappings merged; a list or a
    value from a flag replaces the file's)."""
    out = dict(base)
    for key, value in flags.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = value
    return out


def check(spec: dict[str, Any], path: str) -> None:
    """The managers' own validation, run here first: CliError ``FILE: FIELD: message``."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.validate import validate_spec

    try:
        validate_spec(spec)
    except ValidationError as exc:
        msg = str(exc)
        field = exc.field or "spec"
        if not msg.startswith(field):
            msg = f"{field}: {msg}"
        raise CliError(f"{path}: {msg}", field) from None
