"""Placeholders in a service's task template, as Docker Swarm's (``docker service create
--hostname "{{.Node.Hostname}}-{{.Service.Name}}"``): a field that names its task, node or
service, filled in by the node that runs the task.

Owns: the placeholder syntax (a subset of Go's text/template: ``{{.Service.Name}}``, spaces
inside the braces allowed, and ``{{index .Service.Labels "KEY"}}``), checking a text's
placeholders (``check``) and filling them in (``expand``). Which fields take them is the
caller's: the hostname, env values and mounts' sources and targets (shoal.node.worker, as
Docker's). Must not touch: I/O, the state.

Placeholders (Docker's names):

    .Service.ID .Service.Name .Service.Labels (with index)
    .Node.ID .Node.Hostname .Node.Platform.OS .Node.Platform.Architecture
    .Task.ID .Task.Name .Task.Slot
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol


class TaskFields(Protocol):
    """What the placeholders read of a task (shoal.raft.models.Task has it: no import of
    it here, which imports this module)."""

    @property
    def id(self) -> str: ...
    @property
    def service_id(self) -> str: ...
    @property
    def service_name(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def slot(self) -> int: ...

PLACEHOLDERS = (".Service.ID", ".Service.Name", ".Node.ID", ".Node.Hostname",
                ".Node.Platform.OS", ".Node.Platform.Architecture", ".Task.ID", ".Task.Name",
                ".Task.Slot")
_ACTION_RE = re.compile(r"\{\{(.*?)\}\}", re.S)
_INDEX_RE = re.compile(r'^index\s+\.Service\.Labels\s+"([^"\\]*)"$')


def task_values(task: TaskFields, hostname: str, arch: str) -> dict[str, str]:
    """The placeholders' values for ``task`` on its node (``hostname``; ``arch`` as uname's
    machine). A global task's ``.Task.Slot`` is its node's id, as its name."""
    return {".Service.ID": task.service_id, ".Service.Name": task.service_name,
            ".Node.ID": task.node_id, ".Node.Hostname": hostname,
            ".Node.Platform.OS": "linux", ".Node.Platform.Architecture": arch,
            ".Task.ID": task.id, ".Task.Name": f"{task.name}.{task.id}",
            ".Task.Slot": str(task.slot) if task.slot else task.node_id}


def has_placeholders(text: str) -> bool:
    return "{{" in text


def check(text: str) -> None:
    """ValueError naming the first placeholder ``text`` cannot have (an unknown name, Go
    template syntax beyond the placeholders, an unclosed ``{{``)."""
    _expand(text, None)


def expand(text: str, values: Mapping[str, str], labels: Mapping[str, str]) -> str:
    """``text`` with its placeholders filled in: ``values`` maps each of ``PLACEHOLDERS``
    to its value; ``labels`` are the service's, for ``index .Service.Labels "KEY"`` (a
    missing label is empty, as Go's index of a map)."""
    return _expand(text, (values, labels))


def could_be(text: str, name: str) -> bool:
    """Whether ``text`` (with placeholders or not) can become ``name`` on some node: a
    volume ``data-{{.Task.Slot}}`` is in use as ``data-1`` (what ``volume rm`` asks)."""
    if not has_placeholders(text):
        return text == name
    parts = _ACTION_RE.split(text)[::2]  # (the text between the placeholders)
    return re.fullmatch(".+".join(re.escape(p) for p in parts), name) is not None


def _expand(text: str, given: tuple[Mapping[str, str], Mapping[str, str]] | None) -> str:
    out: list[str] = []
    pos = 0
    for m in _ACTION_RE.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        action = m.group(1).strip()
        index = _INDEX_RE.match(action)
        if index is not None:
            out.append("" if given is None else given[1].get(index.group(1), ""))
        elif action in PLACEHOLDERS:
            out.append("" if given is None else given[0][action])
        else:
            raise ValueError(f"unknown placeholder {m.group(0)!r} (known: "
                             f"{', '.join('{{' + p + '}}' for p in PLACEHOLDERS)}, "
                             '{{index .Service.Labels "KEY"}})')
    rest = text[pos:]
    if "{{" in rest:
        raise ValueError(f"unclosed placeholder in {text!r}")
    out.append(rest)
    return "".join(out)


__all__ = ["PLACEHOLDERS", "check", "could_be", "expand", "has_placeholders"]
