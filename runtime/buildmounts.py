"""A RUN step's BuildKit extras in ``shoal image build``: its ``--mount``s, its heredocs, its
shell, and what it must leave out of its layer.

Owns: making the host side of each ``RUN --mount`` (``run_mounts``: the RUN task's
``MountSpec``s) — ``type=cache``: a directory kept by the node across builds under
``DATA_DIR/build/cache`` (one per ``id``, default the target), its content never in a layer,
``sharing=locked`` runs one RUN at a time on it, ``private`` gives a RUN a fresh, throw-away
one while another uses it, ``shared`` (the default) no wait; which of them RUNs use now
(``busy_caches``), handing one over to ``builder prune`` only when none does
(``take_cache``), their ids (``CACHE_IDS``) and last use (the directory's mtime, set when a
RUN lets it go); ``type=bind``: a path of the
build context, or of a stage's / an image's files (``from=``, copied out of its layers),
read-only unless ``rw`` (then a copy: writes are discarded); ``type=tmpfs``; the build-cache
part of a RUN's mounts (``mount_digest``: their options, the content of the context paths
they bind, the id of the image they bind from, never a cache's content, as BuildKit); the
RUN's argv from its heredocs and the stage's SHELL (``run_argv``, BuildKit's rules); a
COPY/ADD's heredoc files (``copy_heredocs``); the mount points a RUN's mounts made in its
upper dir (``stub_paths`` / ``remove_stubs``: BuildKit leaves no trace of a directory or
empty file made only to mount on). Must not touch: the image store (the builder hands in
layer directories), the runtime (the builder runs the task), the Dockerfile's parsing
(shoal.runtime.dockerfile's ``run_flags``/``parse_mount``).

Errors: ``BuildError`` (shoal.runtime.errors) naming the Dockerfile line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shoal.runtime.buildstages import LayeredFS
from shoal.runtime.dockerfile import (
    DEFAULT_SHELL,
    SECRET_ID,
    Heredoc,
    Instruction,
    RunMount,
    expand,
    hash_entry,
    heredoc_word,
    split_words,
)
from shoal.runtime.errors import BuildError
from shoal.runtime.layers import resolve_in_layers
from shoal.runtime.records import FileValue
from shoal.runtime.rootfs import MountSpec

#: Where a heredoc script with a ``#!`` line is put for its RUN (a mount point: not layered).
SCRIPT_DIR = "/.shoal-heredoc"
#: Where a RUN whose secrets are variables (``env=``) gets them and the script that sets them
SECRET_ENV_DIR = "/.shoal-secret-env"
#: BuildKit's cap on one secret's size (``--secret``): 500 KiB
MAX_SECRET = 500 << 10

# cache directories in use by RUNs of this process: path -> (RUNs using it, its lock)
_BUSY: dict[str, int] = {}
_LOCKS: dict[str, asyncio.Lock] = {}
#: ``DATA_DIR/build/cache-ids.json``: a cache directory's name -> {"id": its id= (or
#: target), "created": Unix time} (what ``builder prune``'s listing and ``id=`` show)
CACHE_IDS = "cache-ids.json"

#: (the stage/image a ``from=`` names) -> its unpacked layer directories, top first
Layers = Callable[[RunMount], Sequence[Path]]


def run_argv(ins: Instruction, command: str, shell: Sequence[str]
             ) -> tuple[list[str], dict[str, FileValue]]:
    """The RUN's argv (and files to give the task) as BuildKit makes it: the exec form as
    written; a command that is one heredoc alone, ``RUN <<EOF``, runs its content with the
    shell — or, when it starts with ``#!``, as a script file; any other command with heredocs
    (``RUN python3 <<EOF``) goes to the shell with the heredocs after it, which reads them
    (expanding variables at run time unless the delimiter is quoted)."""
    shell = list(shell or DEFAULT_SHELL)
    argv = Instruction(ins.line, ins.cmd, command).exec_form()
    if argv is not None:
        if ins.heredocs:
            raise BuildError("RUN: heredocs need the shell form, not a JSON array", ins.line)
        return argv, {}
    if not ins.heredocs:
        return [*shell, command], {}
    words = split_words(command)
    if len(words) == 1 and len(ins.heredocs) == 1 and heredoc_word(words[0]) is not None:
        doc = ins.heredocs[0]
        if doc.text().startswith("#!"):
            name = posixpath.basename(doc.name)  # (a file of SCRIPT_DIR, whatever its name)
            path = f"{SCRIPT_DIR}/{name if name not in ('', '.', '..') else 'script'}"
            return [path], {path: (doc.text().encode(), 0o755)}
        return [*shell, doc.text()], {}
    full = command
    for doc in ins.heredocs:
        full += "\n" + doc.content + doc.name
    return [*shell, full], {}


def secret_files(ins: Instruction, mounts: Sequence[RunMount], secrets: Mapping[str, bytes],
                 argv: Sequence[str]) -> tuple[list[str], dict[str, FileValue]]:
    """A RUN's ``type=secret`` mounts as files of its task (TaskConfig.files: handed to the
    launcher through its pipe, written to the task's staging tmpfs and bound read-only — never
    on the node's disk, never in the task's config.json) and its argv: as given, or, when a
    secret is a variable (``env=``), run by a script that reads it from such a file, exports
    it and execs the command (a variable of the task's config would be on disk; its
    /bin/sh and cat are the image's). A required secret the build lacks: BuildError naming
    the line (never its value); another one is skipped (BuildKit's)."""
    files: dict[str, FileValue] = {}
    reads: list[str] = []
    exports: list[str] = []
    for m in mounts:
        if m.type != "secret":
            continue
        value = secrets.get(m.id)
        if value is None:
            if m.required:
                raise BuildError(f"RUN --mount=type=secret: secret {m.id!r} is required and "
                                 f"the build was given none of that id (--secret id={m.id},"
                                 "...)", ins.line)
            continue
        if m.target:
            files[m.target] = (value, m.mode, m.uid, m.gid)
        if m.env:
            n = len(exports)
            path = f"{SECRET_ENV_DIR}/{n}"
            files[path] = (value, 0o400)  # (the task's user's: the script reads it as them)
            # every file read before any variable is set (an env=PATH must not hide the
            # next `cat`), and a read that failed (no cat in the image) fails the RUN, never
            # an empty variable; the "." keeps trailing newlines from $(...)
            reads.append(f'_shoal_s{n}="$(cat {path} && echo .)"\n'
                         f'case $_shoal_s{n} in *.) ;; *) echo "RUN --mount=type=secret: '
                         f'cannot read secret {m.id} for {m.env} (the image needs cat)" >&2; '
                         "exit 1;; esac")
            exports.append(f'{m.env}="${{_shoal_s{n}%.}}"; export {m.env}')
    if not exports:
        return list(argv), files
    script = "#!/bin/sh\n" + "\n".join(reads + exports) + '\nexec "$@"\n'
    files[f"{SECRET_ENV_DIR}/env"] = (script.encode(), 0o555)
    return [f"{SECRET_ENV_DIR}/env", *argv], files


#: ``--secret``s in one build request, at most (each at most MAX_SECRET bytes)
MAX_SECRETS = 64


def read_secrets(raw: bytes) -> dict[str, bytes]:
    """The build's secrets from the request's secrets part (JSON ``{"ID": base64}``, the
    body's first bytes, never a query: nothing of them in an access log), each id and size
    checked; BuildError with ``field="secret"`` naming the secret, never quoting a value."""
    import base64
    import binascii

    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        raise BuildError("the secrets part is not JSON", field="secret") from None
    except RecursionError:  # (json's C decoder recurses per nesting level)
        raise BuildError("the secrets part is nested too deeply", field="secret") from None
    if not isinstance(doc, dict) or len(doc) > MAX_SECRETS:
        raise BuildError(f"the secrets part must map at most {MAX_SECRETS} ids to base64 "
                         "values", field="secret")
    out: dict[str, bytes] = {}
    for sid, value in doc.items():
        if not SECRET_ID.fullmatch(sid):
            raise BuildError(f"secret id {sid[:140]!r} is not one (letters, digits, '_', '.', "
                             "'-'; at most 128)", field="secret")
        try:
            if not isinstance(value, str):
                raise ValueError
            out[sid] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BuildError(f"secret {sid}: its value is not base64", field="secret") from None
        if len(out[sid]) > MAX_SECRET:
            raise BuildError(f"secret {sid} is {len(out[sid])} bytes: at most {MAX_SECRET} "
                             "(500 KiB, BuildKit's limit)", field="secret")
    return out


def copy_heredocs(ins: Instruction, args: str, env: Mapping[str, str], into: Path
                  ) -> tuple[str, list[tuple[str, str, bool]], str]:
    """A COPY/ADD's heredocs as files written in ``into`` (mode 0644, named by their
    delimiter, variables expanded unless it was quoted): (``args`` — as written: its
    heredoc words are the delimiters the parser read, never what ``env`` makes of them —
    without the heredoc words, the others expanded, [(file, path in the image, False)],
    their digest)."""
    words = split_words(args)
    rest = [expand(w, env) for w in words if heredoc_word(w) is None]
    docs = {d.name: d for d in ins.heredocs}
    if not rest or heredoc_word(words[-1]) is not None:
        raise BuildError(f"{ins.cmd} <<{ins.heredocs[0].name} needs a destination", ins.line)
    dest = rest[-1]
    srcs = [w for w in rest[:-1] if not w.startswith("--")]
    named = [heredoc_word(w) for w in words]
    many = len(srcs) + len(ins.heredocs) > 1 or dest.endswith("/")
    out: list[tuple[str, str, bool]] = []
    sha = hashlib.sha256()
    for word in named:
        if word is None:
            continue
        doc: Heredoc = docs[word[0]]
        text = expand(doc.text(), env) if doc.expand else doc.text()
        name = posixpath.basename(doc.name) or "heredoc"
        if name in (".", ".."):
            raise BuildError(f"{ins.cmd} <<{doc.name}: a heredoc's name is its file's: not "
                             f"{name}", ins.line)
        (into / str(len(out))).mkdir()
        path = into / str(len(out)) / name
        path.write_text(text)
        path.chmod(0o644)
        target = posixpath.join(dest, posixpath.basename(doc.name)) if many else dest
        out.append((str(path), target, False))
        sha.update(f"{target}\0{text}\0".encode())
    return " ".join(rest), out, sha.hexdigest()


def mount_digest(ctx: Path, mounts: Sequence[RunMount], from_ids: Mapping[str, str],
                 line: int = 0) -> str:
    """The build-cache part of a RUN's mounts: their options, the content of the context
    paths bound (names, modes, bytes), the id of the image bound from; "" with no mount.
    A cache mount's content is not in it (BuildKit's)."""
    if not mounts:
        return ""
    sha = hashlib.sha256(json.dumps([asdict(m) for m in mounts]).encode())
    for m in mounts:
        if m.type == "bind" and m.from_:
            sha.update(f"from\0{from_ids.get(m.from_, '')}\0".encode())
        elif m.type == "bind":
            src = _context_path(ctx, m, line)
            for path in [src, *sorted(src.rglob("*"))] if src.is_dir() else [src]:
                hash_entry(sha, path, str(path.relative_to(ctx)))
    return sha.hexdigest()


def _context_path(ctx: Path, m: RunMount, line: int) -> Path:
    rel = posixpath.normpath(m.source.lstrip("/") or ".")
    path = (ctx / rel) if rel != "." else ctx
    real, root = os.path.realpath(path), os.path.realpath(ctx)
    if rel.startswith("..") or not (real == root or real.startswith(root + "/")):
        raise BuildError(f"RUN --mount: source {m.source} is outside the build context", line)
    if not os.path.lexists(path):
        raise BuildError(f"RUN --mount: source {m.source or '.'} not found in the build "
                         "context", line)
    return path


@contextlib.asynccontextmanager
async def run_mounts(ins: Instruction, mounts: Sequence[RunMount], ctx: Path, build_dir: Path,
                     tmp: Path, layers: Layers) -> AsyncIterator[list[MountSpec]]:
    """The RUN task's mounts for ``mounts``, held for the ``async with`` (a locked cache's
    lock, a private cache's or a rw bind's copy: released, removed at its end, on failure
    too); ``layers`` gives a ``from=``'s image layers."""
    async with contextlib.AsyncExitStack() as stack:
        specs: list[MountSpec] = []
        for m in mounts:
            if m.type == "secret":  # (files of the task: secret_files)
                continue
            if m.type == "tmpfs":
                specs.append(MountSpec("tmpfs", m.target, tmpfs_size=m.size))
            elif m.type == "cache":
                path = await _cache_dir(ins, m, build_dir, tmp, stack, layers, ctx)
                specs.append(MountSpec("bind", m.target, str(path), readonly=m.readonly))
            else:
                src = await asyncio.to_thread(_bind_source, ins, m, ctx, tmp, layers, stack)
                specs.append(MountSpec("bind", m.target, str(src), readonly=m.readonly))
        yield specs


async def _cache_dir(ins: Instruction, m: RunMount, build_dir: Path, tmp: Path,
                     stack: contextlib.AsyncExitStack, layers: Layers, ctx: Path) -> Path:
    key = hashlib.sha256((m.id or m.target).encode()).hexdigest()[:32]
    path = build_dir / "cache" / key
    name = str(path)
    if m.sharing == "locked":
        lock = _LOCKS.setdefault(name, asyncio.Lock())
        await stack.enter_async_context(lock)
    elif m.sharing == "private" and _BUSY.get(name):
        path = Path(tempfile.mkdtemp(dir=tmp, prefix="cache-"))  # (thrown away after)
        stack.callback(shutil.rmtree, path, True)
    _BUSY[name] = _BUSY.get(name, 0) + 1
    stack.callback(_release, name)
    if not path.is_dir() or path.parent == tmp:
        await asyncio.to_thread(_new_cache, ins, m, path, tmp, layers, ctx)
        if path.parent != tmp:
            _note_cache(build_dir, path.name, m.id or m.target)
    return path


def _release(name: str) -> None:
    _BUSY[name] -= 1
    if not _BUSY[name]:
        del _BUSY[name]
    with contextlib.suppress(OSError):  # its last use (builder prune's `until`): now
        os.utime(name)


def cache_names(build_dir: Path) -> dict[str, dict[str, Any]]:
    """``CACHE_IDS``' content ({} when missing or unreadable)."""
    try:
        raw = json.loads((build_dir / CACHE_IDS).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict)} \
        if isinstance(raw, dict) else {}


def _note_cache(build_dir: Path, key: str, name: str) -> None:
    """Record a new cache directory's id (on the event loop: one writer at a time)."""
    import time

    names = cache_names(build_dir)
    names[key] = {"id": name, "created": time.time()}
    tmp = build_dir / f"{CACHE_IDS}.{os.getpid()}"
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(names, indent=0, sort_keys=True))
        os.replace(tmp, build_dir / CACHE_IDS)


def busy_caches() -> set[str]:
    """The cache directories RUNs of this process use now (or hold locked)."""
    return set(_BUSY) | {name for name, lock in _LOCKS.items() if lock.locked()}


def take_cache(path: Path, trash: Path) -> bool:
    """Move the cache directory ``path`` to ``trash`` (``builder prune``'s, which then
    deletes it) unless a RUN uses it or holds its lock; call it on the builds' event loop,
    so that no RUN starts to use it in between (a RUN waiting for its lock makes a new,
    empty one). Whether it was taken."""
    name = str(path)
    if name in busy_caches():
        return False
    try:
        os.rename(path, trash)
    except OSError:  # (gone already)
        return False
    return True


def _new_cache(ins: Instruction, m: RunMount, path: Path, tmp: Path, layers: Layers,
               ctx: Path) -> None:
    """A new cache directory: empty, or a copy of ``from=``'s ``source``; mode, uid, gid."""
    work = Path(tempfile.mkdtemp(dir=tmp, prefix="cache-new-"))
    try:
        if m.from_:
            _copy_out(ins, m, layers(m), work / "d")
        else:
            (work / "d").mkdir()
        os.chmod(work / "d", m.mode)
        os.chown(work / "d", m.uid, m.gid)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent == tmp:
            path.rmdir()
        with contextlib.suppress(OSError):  # (another build made it meanwhile: that one)
            os.rename(work / "d", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bind_source(ins: Instruction, m: RunMount, ctx: Path, tmp: Path, layers: Layers,
                 stack: contextlib.AsyncExitStack) -> Path:
    """The host path a bind mount binds: the context's own path when read-only, else a copy
    (of the context's, or of ``from=``'s files) removed at the end."""
    if not m.from_ and m.readonly:
        return _context_path(ctx, m, ins.line)
    work = Path(tempfile.mkdtemp(dir=tmp, prefix="bind-"))
    stack.callback(shutil.rmtree, work, True)
    if m.from_:
        _copy_out(ins, m, layers(m), work / "d")
    else:
        src = _context_path(ctx, m, ins.line)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, work / "d", symlinks=True)
        else:
            shutil.copy2(src, work / "d", follow_symlinks=False)
    return work / "d"


def _copy_out(ins: Instruction, m: RunMount, layers: Sequence[Path], dest: Path) -> None:
    """``m.source`` of the image whose layers are ``layers`` copied to ``dest`` (owners,
    modes, symlinks kept; device nodes left out)."""
    fs = LayeredFS(layers)
    found = fs.lookup("/" + m.source.lstrip("/"))
    if found is None or not found[1]:
        if found is not None and not layers:  # (the root of scratch)
            dest.mkdir()
            return
        raise BuildError(f"RUN --mount from={m.from_}: {m.source or '/'} not found there",
                         ins.line)
    top = found[1][0]
    if not stat.S_ISDIR(os.lstat(top).st_mode):
        shutil.copy2(top, dest)
        return
    dest.mkdir()
    _meta(top, dest)
    for rel, file in fs.walk(found[1]):
        out = dest / rel
        st = os.lstat(file)
        if stat.S_ISDIR(st.st_mode):
            out.mkdir()
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(file), out)
        else:
            shutil.copy2(file, out)
        _meta(file, out)


def _meta(src: Path, dest: Path) -> None:
    st = os.lstat(src)
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dest, stat.S_IMODE(st.st_mode))


# ----------------------------------------------------------------------------- mount stubs


def stub_paths(lower: Sequence[Path], targets: Sequence[str]) -> list[str]:
    """The paths (relative to the root, as the upper dir holds them, each before its parent)
    that mounting on ``targets`` creates in a root whose layers are ``lower``: the
    target and its parents the image lacks (BuildKit's mount stubs), where the launcher
    makes them: at the end of the image's symlinks (``resolve_in_layers``), a dangling
    one's too. One walk per target: the components the image has are those it gives a
    stat for (this runs on the builds' event loop: a walk back down per missing one froze
    it)."""
    out: list[str] = []
    seen: set[str] = set()
    for target in targets:
        found = resolve_in_layers(list(lower), target)
        if found is None:
            continue  # (a symlink loop: the RUN fails to start)
        resolved, stats = found
        parts = [p for p in resolved.split("/") if p]
        n = next((i for i, st in enumerate(stats) if st is None), len(parts))
        missing = ["/".join(parts[:k + 1]) for k in range(n, len(parts))]
        for p in reversed(missing):
            if p not in seen:
                seen.add(p)
                out.append(p)
    # (children first across targets too: /new/a, /new, then /new/b would leave /new)
    return sorted(out, key=lambda p: -p.count("/"))


def stubs_in_mounts(specs: Sequence[MountSpec], targets: Sequence[str]
                    ) -> list[tuple[Path, list[str]]]:
    """For each of ``targets`` (a RUN's files: secrets...) inside a writable bind of the RUN
    (a cache mount's directory, on the node's disk, kept after it): that directory and the
    paths under it, each before its parent, that the launcher will make for the target's
    mount point — the ones missing now. Read before the RUN starts; ``remove_stubs`` them
    after it, or an empty ``.npmrc`` stays in the cache for every later RUN."""
    out: list[tuple[Path, list[str]]] = []
    for target in targets:
        inside = [s for s in specs if s.type == "bind" and not s.readonly
                  and target.startswith(s.target.rstrip("/") + "/")]
        if not inside:
            continue
        owner = max(inside, key=lambda s: len(s.target))  # (the deepest one holds it)
        parts = target[len(owner.target.rstrip("/")) + 1:].split("/")
        k = next((i for i in range(len(parts))
                  if not os.path.lexists(os.path.join(owner.source, *parts[:i + 1]))), None)
        if k is not None:
            out.append((Path(owner.source), ["/".join(parts[:j + 1])
                                             for j in reversed(range(k, len(parts)))]))
    return out


def remove_stubs(upper: Path, stubs: Sequence[str]) -> None:
    """Remove from a RUN's upper dir what ``stub_paths`` listed, when the RUN left it as it
    was made: an empty directory, an empty file. Each is reached by directory descriptors
    that follow no symlink: the RUN may have moved a stub's parent away (its mount goes
    with it) and put a symlink to a host path in its place."""
    for rel in stubs:
        *parents, name = rel.split("/")
        if any(p in ("", ".", "..") for p in [*parents, name]):
            continue
        fd = -1
        try:
            fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
            for part in parents:
                below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=fd)
                os.close(fd)
                fd = below
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=fd)  # (only when empty: ENOTEMPTY else)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(name, dir_fd=fd)
        except OSError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
