"""How a manager writes a service's secret and config references into the log (Docker's
defaults from schema 11, without moving a running service's files).

Owns: ``docker_file_defaults`` (pure). What a reference means once written is
shoal.raft.podspec's ``FileRef``/``file_path``; the gate on older schemas is
shoal.raft.schema's ``GATED_ITEMS``. Must not touch: the store, the network.
"""

from __future__ import annotations

import msgspec

from shoal.raft.podspec import (
    CONFIGS_DIR,
    FILE_NAME_RE,
    FILE_TARGETS,
    SECRETS_DIR,
    FileRef,
    file_path,
)


def docker_file_defaults(refs: tuple[FileRef, ...], kind: str,
                         previous: tuple[FileRef, ...], schema: int) -> tuple[FileRef, ...]:
    """A new or updated spec's secret or config references (``kind``) as a manager writes
    them into the log, ``previous`` being the service's current ones (() for a new service)
    and ``schema`` the cluster's. Pure: the written spec says where each file is, so no node
    ever decides it differently.

    From schema 11 (``FILE_TARGETS``), Docker's defaults for a reference the service did not
    have: a config's file name means ``/<name>`` (Docker's containerConfigMountPath, "/"),
    uid and gid "0". A reference at a place the current spec already uses keeps its form
    there: a config file name the current spec has in /run/configs stays there (redeploying
    an old stack, `--config-rm a --config-add source=b,target=a`: its running tasks' files do
    not move), a target written differently for the same path keeps the current text (no
    redeploy), and an owner left empty stays the task's user where it was. Below schema 11
    the absolute targets older nodes can express (``/run/secrets/F``, ``/run/configs/F``) are
    written as their file names; nothing else changes (the gate refuses the rest by name)."""
    base = SECRETS_DIR if kind == "secret" else CONFIGS_DIR
    out = []
    if schema < FILE_TARGETS:
        for r in refs:
            head, _, tail = r.target.rpartition("/")
            if head == base and FILE_NAME_RE.match(tail) and tail not in (".", ".."):
                r = msgspec.structs.replace(r, target=tail)
            out.append(r)
        return tuple(out)
    before = {p.file_path(kind): p for p in previous}
    for r in refs:
        target = r.target
        if kind == "config" and not target.startswith("/") and \
                file_path(kind, target, r.name) not in before:
            target = "/" + (target or r.name)  # (Docker's default place)
        path = file_path(kind, target, r.name)
        was = before.get(path)
        if was is not None and file_path(kind, was.target, r.name) == path:
            target = was.target  # (the same place: as written before)
        # (an owner is the task's user, both empty, as before schema 11, or two numbers)
        legacy = was is not None and not (was.uid or was.gid or r.uid or r.gid)
        out.append(msgspec.structs.replace(r, target=target, uid=r.uid or ("" if legacy else "0"),
                                           gid=r.gid or ("" if legacy else "0")))
    return tuple(out)


__all__ = ["docker_file_defaults"]
