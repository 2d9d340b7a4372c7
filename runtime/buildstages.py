"""Multi-stage builds: the stages of a Dockerfile, the ones a target needs, and the files one
stage takes from another image (``COPY --from``).

Owns: splitting parsed instructions into stages (``plan_stages``: ``FROM IMAGE [AS NAME]``,
names case-insensitive; a FROM naming an earlier stage builds on it; every ``COPY --from`` and
``RUN --mount=...,from=`` — a stage's name or index, else an image reference — resolved before
anything runs, errors naming the line), the target (``target_stage``) and the stages it needs
(``needed``, as BuildKit: the others are not built), and reading an image's files without
mounting anything (``LayeredFS``: its unpacked layers merged as overlayfs would merge them —
whiteouts and opaque directories hide what is below, symlinks followed inside the image) into
the (source, path in image) list ``stage_sources`` gives the builder's COPY. Pure but for
reading layer directories. Must not touch: running steps, the build cache, the image store (the
builder hands in the directories ``ImageStore.layer_dirs`` gives).

Errors: ``BuildError`` (shoal.runtime.errors) with ``line`` = the Dockerfile line (0 and
``field="target"`` for an unknown target).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shlex
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from shoal.runtime.dockerfile import Instruction, RunMount, expand, run_flags
from shoal.runtime.errors import BuildError
from shoal.runtime.layers import MAX_STEPS, merged_child

#: Docker's stage names (compared in lower case): a letter, then letters, digits, ``._-``.
STAGE_NAME = re.compile(r"[a-z][a-z0-9._-]*")


@dataclass
class Stage:
    index: int  # 0-based, in file order (COPY --from=N)
    name: str  # lower case; "" when the FROM gives no AS NAME
    from_ins: Instruction
    base: str  # the FROM's image, global ARGs expanded ("scratch" too)
    base_stage: int | None  # FROM an earlier stage: its index (``base`` is its name)
    instructions: list[Instruction] = field(default_factory=list)  # those after its FROM
    # COPY --from of this stage's instructions: an earlier stage's index or an image reference
    copy_from: dict[Instruction, int | str] = field(default_factory=dict)
    # RUN --mount=...,from=X of this stage's instructions: X (as written) -> an earlier
    # stage's index or an image reference
    mount_from: dict[Instruction, dict[str, int | str]] = field(default_factory=dict)
    # each --mount's from= of this stage's RUNs, as resolved with the global ARGs ("": none)
    mount_froms: dict[Instruction, tuple[str, ...]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the build output names it: its name, else its index."""
        return self.name or str(self.index)

    def deps(self) -> set[int]:
        """The stages this one reads: its base stage, its COPY --from and RUN --mount from=
        stages."""
        out = {v for v in self.copy_from.values() if isinstance(v, int)}
        out |= {v for m in self.mount_from.values() for v in m.values() if isinstance(v, int)}
        return out | ({self.base_stage} if self.base_stage is not None else set())


def platform_args(os_: str, arch: str, variant: str) -> dict[str, str]:
    """BuildKit's automatic platform ARGs (``TARGETARCH``...: global, so FROM lines see them;
    a stage after ``ARG NAME``): a node builds for its own platform, so BUILD* = TARGET*."""
    plat = "/".join(p for p in (os_, arch, variant) if p)
    out: dict[str, str] = {}
    for pre in ("BUILD", "TARGET"):
        out.update({f"{pre}PLATFORM": plat, f"{pre}OS": os_, f"{pre}ARCH": arch,
                    f"{pre}VARIANT": variant})
    return out


def parse_from(ins: Instruction, meta: Mapping[str, str], platform: str = ""
               ) -> tuple[str, str]:
    """``FROM [--platform=P] IMAGE [AS NAME]`` → (IMAGE with the global ARGs expanded, NAME
    lower case or ""). ``--platform`` must be this node's ``platform`` (os/arch[/variant]:
    what it builds; ``$BUILDPLATFORM``, ``$TARGETPLATFORM`` are), else BuildError."""
    words = expand(ins.args, meta).split()
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        key, sep, value = flag[2:].partition("=")
        if key != "platform" or not sep:
            raise BuildError(f"FROM: unsupported flag {flag} (only --platform=)", ins.line)
        if not platform or value not in (platform, "/".join(platform.split("/")[:2])):
            raise BuildError(f"FROM {flag}: this node builds {platform or 'its own'} images "
                             "only", ins.line)
    if not words or (len(words) == 2 and words[0].upper() == "AS"):
        given = [w for w in ins.args.split() if not w.startswith("--")]
        unset = f" ({given[0]} is empty: give its ARG a default or --build-arg)" if (
            given and "$" in given[0]) else ""
        raise BuildError(f"FROM needs an image{unset}", ins.line)
    if len(words) == 1:
        return words[0], ""
    if len(words) != 3 or words[1].upper() != "AS":
        raise BuildError(f"FROM {ins.args}: expected FROM IMAGE [AS NAME]", ins.line)
    name = words[2].lower()
    if not STAGE_NAME.fullmatch(name):
        raise BuildError(f"FROM: {words[2]!r} is not a stage name (a letter, then letters, "
                         "digits, '.', '_' or '-')", ins.line)
    return words[0], name


def copy_flags(ins: Instruction, args: str | None = None) -> tuple[dict[str, str], str]:
    """The ``--name=value`` flags before a COPY/ADD's sources (``--chown``, ``--from``;
    ``--link`` alone) and the rest (``args``: the instruction's as expanded, else as
    written)."""
    out: dict[str, str] = {}
    text = (ins.args if args is None else args).strip()
    while text.startswith("--"):
        word, _, text = text.partition(" ")
        text = text.lstrip()
        try:
            [word] = shlex.split(word)
        except ValueError:
            raise BuildError(f"{ins.cmd}: bad flag {word}", ins.line) from None
        key, sep, value = word[2:].partition("=")
        if key == "link" and not sep:
            value = "true"  # (BuildKit's --link: the same files, layered alike here)
        elif not sep:
            raise BuildError(f"{ins.cmd}: unsupported flag {word}", ins.line)
        elif not value:
            raise BuildError(f"{ins.cmd}: flag --{key} needs a value (--{key}=VALUE)",
                             ins.line)
        out[key] = value
    return out, text


def plan_stages(instructions: Sequence[Instruction], meta: Mapping[str, str],
                platform: str = "") -> list[Stage]:
    """The stages of a parsed Dockerfile (what follows each FROM; the ARGs before the first
    are the caller's, ``meta`` their values; ``platform`` this node's, which FROM's
    --platform must name), with every stage reference resolved. A FROM
    naming an earlier stage builds on it (one naming itself, ``FROM node AS node``, is the
    image, as Docker's); ``COPY --from`` takes an earlier stage by name or index, else an
    image reference. BuildError naming the line: a duplicate stage name, a reference to the
    stage itself or to a later one, an index no stage has, ``ADD --from``."""
    stages: list[Stage] = []
    by_name: dict[str, Stage] = {}
    for ins in instructions:
        if ins.cmd == "FROM":
            ref, name = parse_from(ins, meta, platform)
            if name in by_name:
                raise BuildError(f"FROM: duplicate stage name {name!r} (first at line "
                                 f"{by_name[name].from_ins.line})", ins.line)
            base = by_name.get(ref.lower())
            stages.append(Stage(len(stages), name, ins, ref,
                                base.index if base is not None else None))
            if name:
                by_name[name] = stages[-1]
        elif stages:  # (before the first FROM: only ARGs, parse_dockerfile checked)
            stages[-1].instructions.append(ins)
    for st in stages:
        later = by_name.get(st.base.lower())
        if st.base_stage is None and later is not None and later.index > st.index:
            raise BuildError(f"FROM {st.base}: stage {later.name!r} is defined later (line "
                             f"{later.from_ins.line}); a stage builds on an earlier one",
                             st.from_ins.line)
        for ins in st.instructions:
            if ins.cmd == "RUN":
                try:
                    mounts = run_flags(ins, meta)[0]
                except BuildError:  # (target=$GOCACHE, a stage's ENV: the RUN's to check)
                    mounts = [replace(m, from_=expand(m.from_, meta))
                              for m in run_flags(ins)[0]]
                st.mount_froms[ins] = tuple(m.from_ for m in mounts)
                for mount in mounts:
                    if mount.from_:
                        st.mount_from.setdefault(ins, {})[mount.from_] = _source(
                            mount.from_, st, stages, by_name, ins,
                            "RUN --mount from")
            if ins.cmd not in ("COPY", "ADD"):
                continue
            value = copy_flags(ins)[0].get("from")
            if value is None:
                continue
            if ins.cmd == "ADD":
                raise BuildError("ADD --from is not supported: use COPY --from", ins.line)
            st.copy_from[ins] = _source(expand(value, meta), st, stages, by_name, ins)
    return stages


def _source(value: str, st: Stage, stages: Sequence[Stage], by_name: Mapping[str, Stage],
            ins: Instruction, what: str = "COPY --from") -> int | str:
    """COPY --from=VALUE: an earlier stage's index, or an image reference (a name no stage
    has)."""
    if value.isdigit():
        if int(value) >= len(stages):
            raise BuildError(f"{what}={value}: there is no stage {value} (the stages "
                             f"are 0 to {len(stages) - 1})", ins.line)
        other = stages[int(value)]
    elif value.lower() in by_name:
        other = by_name[value.lower()]
    else:
        return value
    if other.index == st.index:
        raise BuildError(f"{what}={value}: that is this stage itself (a stage copies "
                         "from an earlier one)", ins.line)
    if other.index > st.index:
        raise BuildError(f"{what}={value}: stage {other.label!r} is defined later (line "
                         f"{other.from_ins.line}); a stage copies from an earlier one",
                         ins.line)
    return other.index


def check_mount_from(ins: Instruction, mounts: Sequence[RunMount], stage: Stage
                     ) -> list[RunMount]:
    """A RUN's ``mounts`` (its flags expanded as it runs: the stage's ARGs and ENV) with each
    ``from=`` as ``plan_stages`` resolved it before the build, with the global ARGs (as
    COPY --from's); BuildError when the stage's own values make it another one (the stage
    it names was skipped: its files were an empty directory, or the context, without a
    word)."""
    planned = stage.mount_froms.get(ins, ("",) * len(mounts))
    out = []
    for m, before in zip(mounts, planned, strict=True):
        if m.from_ and m.from_ != before:
            raise BuildError(f"RUN --mount from={m.from_}: a variable in from= must be a "
                             "global ARG: from= is resolved before the build, as COPY "
                             f"--from=, and was {before or '(none)'} then", ins.line)
        out.append(replace(m, from_=before))
    return out


def target_stage(stages: Sequence[Stage], target: str) -> int:
    """The index of the stage ``--target`` names (case-insensitive), the last one when ""."""
    if not target:
        return len(stages) - 1
    for st in stages:
        if st.name and st.name == target.lower():
            return st.index
    names = ", ".join(s.name for s in stages if s.name) or "none has a name"
    raise BuildError(f"target stage {target!r} is not in the Dockerfile (its stages: "
                     f"{names})", field="target")


def needed(stages: Sequence[Stage], target: int) -> set[int]:
    """The stages the target's result depends on (itself included)."""
    out: set[int] = set()
    todo = [target]
    while todo:
        i = todo.pop()
        if i not in out:
            out.add(i)
            todo.extend(stages[i].deps())
    return out


# ------------------------------------------------------------------- an image's merged files


def _isdir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


class LayeredFS:
    """The files of an image as a task would see them, read from its unpacked layers (top
    first, overlayfs form) without a mount: an entry is the topmost layer's; a directory
    merges the layers below it until an opaque one; a whiteout hides what is below."""

    _HOPS = 40  # symlinks followed in one lookup (Linux's limit)

    def __init__(self, layers: Sequence[Path]) -> None:
        self.layers = list(layers)

    def _child(self, dirs: Sequence[Path], name: str) -> list[Path]:
        """``name`` in the merged directory ``dirs``: [the entry] for a non-directory, the
        directories that merge into it (top first) for a directory, [] when absent."""
        entry = merged_child(list(dirs), name)
        return entry[1] if entry is not None else []

    def lookup(self, path: str, follow: bool = True) -> tuple[str, list[Path]] | None:
        """(the path with symlinks resolved, its entries as ``_child`` gives) of an absolute
        path inside the image, or None when absent; a symlink on the way is followed inside
        the image (an absolute target from its root), the last one too when ``follow``."""
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]  # (next last)
        done: list[tuple[str, list[Path]]] = []  # (name, its entries): ".." goes back one
        hops = steps = 0
        while todo:
            steps += 1
            if steps > MAX_STEPS:  # (links full of "x/..": a bounded walk, as the launcher's)
                return None
            name = todo.pop()
            entries = done[-1][1] if done else list(self.layers)
            if name == "..":
                if done:
                    done.pop()
                continue
            if not entries or not _isdir(entries[0]):
                return None  # (the path goes through a non-directory or nothing)
            child = self._child(entries, name)
            if not child:
                return None
            if os.path.islink(child[0]) and (todo or follow):
                hops += 1
                if hops > self._HOPS:
                    return None
                target = os.readlink(child[0])
                if target.startswith("/"):
                    done.clear()
                todo += reversed([p for p in target.split("/") if p not in ("", ".")])
                continue
            done.append((name, child))
        return "/" + "/".join(d[0] for d in done), done[-1][1] if done else list(self.layers)

    def listdir(self, dirs: Sequence[Path]) -> dict[str, list[Path]]:
        """The merged directory ``dirs``: name → its entries (``_child``), sorted."""
        names: set[str] = set()
        for d in dirs:
            names.update(os.listdir(d))
        out = {}
        for name in sorted(names):
            child = self._child(dirs, name)
            if child:
                out[name] = child
        return out

    def glob(self, pattern: str) -> list[tuple[str, list[Path]]]:
        """The paths matching ``pattern`` (``*``, ``?``, ``[...]`` within a component), as
        ``lookup`` gives them; the last symlink of each followed (COPY takes what it points
        at), those inside a match kept as links."""
        parts = [p for p in posixpath.normpath("/" + pattern).split("/") if p]
        paths = ["/"]
        for part in parts:
            nxt: list[str] = []
            for base in paths:
                if not any(c in part for c in "*?["):
                    nxt.append(posixpath.join(base, part))
                    continue
                found = self.lookup(base)
                if found is None or not found[1] or not _isdir(found[1][0]):
                    continue
                nxt += [posixpath.join(base, name) for name in self.listdir(found[1])
                        if fnmatch.fnmatchcase(name, part)]
            paths = nxt
        out = []
        for p in paths:
            found = self.lookup(p)
            if found is not None:
                out.append((p, found[1]))
        return out

    def walk(self, dirs: Sequence[Path], rel: str = "") -> list[tuple[str, Path]]:
        """Everything below the merged directory ``dirs``: (path relative to it, the file
        whose metadata and content it has), parents before what they hold; device nodes,
        fifos and sockets left out (as RUN's layers leave them out)."""
        out: list[tuple[str, Path]] = []
        for name, child in self.listdir(dirs).items():
            path = posixpath.join(rel, name) if rel else name
            s = os.lstat(child[0])
            if stat.S_ISDIR(s.st_mode):
                out.append((path, child[0]))
                out += self.walk(child, path)
            elif stat.S_ISREG(s.st_mode) or stat.S_ISLNK(s.st_mode):
                out.append((path, child[0]))
        return out


def stage_sources(layers: Sequence[Path], ins: Instruction, args: str, what: str
                  ) -> list[tuple[str, str, bool]]:
    """COPY --from's (file in a layer, path in the new image, False) from the image whose
    unpacked layers are ``layers``, as the builder's context COPY lists them (a directory's
    content goes into the destination, which takes the directory's mode and owner). Source
    paths are the image's (relative ones from its root); ``what`` names it in errors."""
    rest = copy_flags(ins, args)[1]
    argv = Instruction(ins.line, ins.cmd, rest).exec_form()  # (flags, then a JSON array)
    if argv is None:
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise BuildError(f"{ins.cmd}: {exc}", ins.line) from None
    if len(argv) < 2:
        raise BuildError(f"{ins.cmd} needs a source and a destination", ins.line)
    *srcs, dest = argv
    fs = LayeredFS(layers)
    out: list[tuple[str, str, bool]] = []
    matched = [(src, fs.glob(src)) for src in srcs]
    many = len(srcs) > 1 or dest.endswith("/") or any(len(m) > 1 for _, m in matched)
    for src, matches in matched:
        if not matches:
            raise BuildError(f"COPY --from={what}: {src} not found there", ins.line)
        for path, entries in matches:
            if not entries:  # (the root of an image with no layer: scratch)
                continue
            top = entries[0]
            if _isdir(top):
                for rel, file in fs.walk(entries):
                    out.append((str(file), posixpath.join(dest, rel), False))
                if path != "/":
                    out.append((str(top), dest, False))
            elif stat.S_ISREG(os.lstat(top).st_mode):  # (a last symlink was followed)
                target = posixpath.join(dest, posixpath.basename(path)) if many else dest
                out.append((str(top), target, False))
            else:
                raise BuildError(f"COPY --from={what}: {src} is not a file or a directory",
                                 ins.line)
    return out
