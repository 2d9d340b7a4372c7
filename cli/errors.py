"""Errors of the `shoal` command line.

Owns: the CLI's error tree; nothing else. Must not touch: anything (no imports).

    CliError        a message for the user: printed as one line (``Error: ...``), exit status 1
     └─ ComposeError   a Compose file `stack deploy` refuses; the message starts with the
                       path of the offending value (``services.web.deploy.replicas: ...``)

The agent's errors reach the CLI as ``{"error": {"code", "message", "field"}}`` replies and
become CliErrors there (cli/main.py); the CLI never raises or imports the node's classes.
"""

from __future__ import annotations


class CliError(Exception):
    """A message for the user; exit status 1. ``field``: the spec field an agent's error
    named (the CLI adds the flag that sets it)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ComposeError(CliError):
    """A Compose file shoal refuses (shoal.cli.compose); ``path`` is where in the file
    (``services.web.ports[1]``), "" for the file as a whole."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
