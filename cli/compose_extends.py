"""Compose's ``extends:``: a service built on another one, of the same file or of another.

Owns: resolving the ``extends`` of every service of one Compose file, as compose-go's loader
does it (loader/extends.go): after the file is interpolated and before it is merged with the
next ``-c`` file; the base service, itself resolved first (a chain; a cycle is an error
naming its services), then the extending service's keys merged onto it by the override
merge (shoal.cli.compose_env.merge, compose-spec's rules, shared with override files). A
service taken from another file (``extends: {file: PATH, service: NAME}``, PATH relative to
the directory its file's paths are relative to) is read from that file alone — its
top-level networks, volumes... are not imported, as the Specification says — interpolated
with the same variables, and its relative paths (``build`` context, ``env_file``,
``label_file``, bind sources of ``volumes``, ``develop.watch`` paths) rebased from its
file's directory to the extending file's, so that they name the same files.

Must not touch: the merge rules themselves (shoal.cli.compose_env), the translation of the
keys (shoal.cli.compose, shoal.cli.compose_keys).

Errors: ``ComposeError`` naming the path of the offending value
(``services.web.extends.service: no service 'x' in base.yml``); in a file reached through
``extends.file`` the path starts with that file (``common.yml: services.db.extends``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cli.compose_env import merge, parse_yaml
from shoal.cli.errors import ComposeError

# interpolates one service's body read from another file: (body, where) → body
Interpolate = Callable[[Any, str], Any]


def resolve_extends(doc: dict[str, Any], source: str, workdir: Path,
                    interpolate: Interpolate | None) -> dict[str, Any]:
    """``doc`` (one file, interpolated) with every service's ``extends`` resolved; the
    document itself is not changed. ``source`` names the file (its path, ``-`` for stdin),
    ``workdir`` is the directory its relative paths are relative to (the project
    directory: compose-go reads every ``-c`` file's paths from there); ``interpolate`` is
    applied to the services read from other files (None: ``--skip-interpolation``)."""
    services = doc.get("services")
    if not isinstance(services, dict) or not any(
            isinstance(body, dict) and "extends" in body for body in services.values()):
        return doc
    key = source if source == "-" else str(Path(source).resolve())
    resolver = _Resolver(workdir, interpolate)
    top = _File(key, "", workdir, {str(k): v for k, v in services.items()})
    out = {name: resolver.service(top, name, ()) for name in top.services}
    return {**doc, "services": out}


class _File:
    """A Compose file's services, as far as extends reads them."""

    def __init__(self, key: str, label: str, workdir: Path, services: dict[Any, Any]) -> None:
        self.key = key  # the resolved path (what a cycle compares)
        self.label = label  # how messages name it ("" for the file being loaded)
        self.workdir = workdir  # the directory its relative paths are relative to
        self.services = services  # NAME → body (other files': not interpolated yet)

    def where(self, name: str) -> str:
        at = f"services.{name}"
        return f"{self.label}: {at}" if self.label else at

    def named(self) -> str:
        return self.label or "this file"


class _Resolver:
    def __init__(self, topdir: Path, interpolate: Interpolate | None) -> None:
        self.topdir = topdir
        self.interpolate = interpolate
        self.files: dict[str, _File] = {}  # other files read, by resolved path
        self.done: dict[tuple[str, str], Any] = {}  # (file, service) → resolved body

    def service(self, f: _File, name: str, trail: tuple[tuple[_File, str], ...]) -> Any:
        """The body of ``name`` in ``f``, its extends resolved (its paths relative to
        ``f.workdir``)."""
        if (f.key, name) in self.done:
            return copy.deepcopy(self.done[(f.key, name)])
        if any(g.key == f.key and n == name for g, n in trail):
            start = next(i for i, (g, n) in enumerate(trail) if g.key == f.key and n == name)
            loop = [*trail[start:], (f, name)]
            g0, n0 = trail[start]
            names = " → ".join(f"{g.label}:{n}" if g.label else n for g, n in loop)
            raise ComposeError(f"{g0.where(n0)}.extends", f"a cycle: {names} (a service "
                               "cannot extend itself, even through others)")
        body = f.services[name]
        if f.label and self.interpolate is not None:
            body = self.interpolate(body, f.where(name))
        if isinstance(body, dict) and "extends" in body:
            base_file, ref = self._target(f, name, body["extends"])
            base = self.service(base_file, ref, (*trail, (f, name)))
            if base is None:
                base = {}
            if not isinstance(base, dict):
                raise ComposeError(f"{f.where(name)}.extends.service", f"{ref!r} in "
                                   f"{base_file.named()} is not a mapping")
            if base_file.workdir != f.workdir:
                base = rebase(base, os.path.relpath(base_file.workdir, f.workdir))
            own = {k: v for k, v in body.items() if k != "extends"}
            body = merge(base, own, name, 2, service=True)
        self.done[(f.key, name)] = body
        return copy.deepcopy(body)

    def _target(self, f: _File, name: str, ext: Any) -> tuple[_File, str]:
        """(the file, the service) ``extends`` names."""
        at = f"{f.where(name)}.extends"
        file: Any = None
        ref: Any
        if isinstance(ext, str):
            ref = ext
        elif isinstance(ext, dict):
            for k in ext:
                if k not in ("service", "file"):
                    raise ComposeError(f"{at}.{k}", "unknown key (extends takes service and "
                                       "file)")
            ref, file = ext.get("service"), ext.get("file")
            if ref is None:
                raise ComposeError(f"{at}.service", "is required")
            if not isinstance(ref, str):
                raise ComposeError(f"{at}.service", f"expected a service name, got {ref!r}")
        else:
            raise ComposeError(at, "expected a service name or a mapping {service: NAME, "
                               f"file: PATH}}, got {ext!r}")
        if file is None:
            if ref not in f.services:
                raise ComposeError(f"{at}.service", f"no service {ref!r} in {f.named()}")
            return f, ref
        if not isinstance(file, str) or not file:
            raise ComposeError(f"{at}.file", f"expected a file's path, got {file!r}")
        if "://" in file:
            raise ComposeError(f"{at}.file", f"{file!r}: a remote file is not supported "
                               "(give a local path)")
        base = self._read(f, file, f"{at}.file")
        if ref not in base.services:
            raise ComposeError(f"{at}.service", f"no service {ref!r} in {base.named()}")
        return base, ref

    def _read(self, f: _File, file: str, at: str) -> _File:
        """The file ``extends.file`` names, relative to ``f``'s directory."""
        path = Path(os.path.expanduser(file))
        path = path if path.is_absolute() else f.workdir / path
        key = str(path.resolve())
        if key == f.key:
            return f
        if key in self.files:
            return self.files[key]
        try:
            text = path.read_text()
        except OSError as exc:
            raise ComposeError(at, f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ComposeError(at, f"cannot read {file}: not UTF-8 text") from None
        label = os.path.relpath(path, self.topdir)
        label = str(path) if label.startswith("..") else label
        doc = parse_yaml(text, label)
        services = doc.get("services")
        if not isinstance(services, dict):
            raise ComposeError(at, f"{file}: the file has no services: mapping")
        self.files[key] = _File(key, label, Path(key).parent,
                                {str(k): v for k, v in services.items()})
        return self.files[key]


# ----------------------------------------------------------------------------- paths

def rebase(body: dict[str, Any], rel: str) -> dict[str, Any]:
    """A service's relative paths, relative to a directory ``rel`` away (from the directory
    they are written for): the keys compose-go rebases (paths/resolve.go). A path that is
    absolute, starts with ``~`` or is still a ``${VAR}`` (not interpolated) is kept."""
    out = dict(body)
    build = out.get("build")
    if isinstance(build, str):
        out["build"] = _context(build, rel)
    elif isinstance(build, dict) and isinstance(build.get("context"), str):
        out["build"] = {**build, "context": _context(build["context"], rel)}
    for key in ("env_file", "label_file"):
        v = out.get(key)
        if isinstance(v, str):
            out[key] = _path(v, rel)
        elif isinstance(v, list):
            out[key] = [_path(i, rel) if isinstance(i, str) else
                        {**i, "path": _path(i["path"], rel)}
                        if isinstance(i, dict) and isinstance(i.get("path"), str) else i
                        for i in v]
    if isinstance(out.get("volumes"), list):
        out["volumes"] = [_volume(v, rel) for v in out["volumes"]]
    develop = out.get("develop")
    if isinstance(develop, dict) and isinstance(develop.get("watch"), list):
        out["develop"] = {**develop, "watch": [
            {**w, "path": _path(w["path"], rel)}
            if isinstance(w, dict) and isinstance(w.get("path"), str) else w
            for w in develop["watch"]]}
    return out


def _path(p: str, rel: str) -> str:
    if not p or p.startswith(("/", "~", "$")):
        return p
    q = os.path.normpath(os.path.join(rel, p))
    return q if q.startswith((".", "/")) else f"./{q}"


def _context(p: str, rel: str) -> str:
    """A build context: a URL or git reference stays as written."""
    return p if "://" in p or p.startswith(("git@", "github.com/")) else _path(p, rel)


def _volume(v: Any, rel: str) -> Any:
    """A bind's source (``./data:/data``, ``{type: bind, source: data}``); a named volume
    stays as written."""
    if isinstance(v, str):
        source, sep, rest = v.partition(":")
        return f"{_path(source, rel)}{sep}{rest}" if sep and source.startswith(".") else v
    if isinstance(v, dict) and v.get("type") == "bind" and isinstance(v.get("source"), str):
        return {**v, "source": _path(v["source"], rel)}
    return v
