"""Dockerfiles and build contexts read, without running anything: the pure half of
``shoal image build``.

Owns: the Dockerfile parser (``parse_dockerfile``: continuations, comments, the instructions
shoal builds — ``SUPPORTED`` — and the ones it refuses by name, errors with line numbers;
BuildKit's heredocs, ``Heredoc``), RUN's flags (``run_flags``: ``--mount`` read into
``RunMount``s by ``parse_mount``, ``--network``), SHELL's argv (``parse_shell``),
Docker's variable substitution (``expand``), ``KEY=VALUE`` pairs (``parse_pairs``),
``HEALTHCHECK``'s options (``parse_healthcheck``), ``.dockerignore`` (``read_dockerignore``,
``ignored``, ``context_files``: which context paths a build sends) and the context files a
COPY/ADD takes (``context_sources``, with their digest). Pure but for reading a
context directory. Must not touch: images, tasks, the build cache (shoal.runtime.build runs
the steps and re-exports these names); nothing here imports the image store, so the CLI can
pack a context without loading the runtime.

Errors: ``BuildError`` (shoal.runtime.errors) with ``line`` = the Dockerfile line, 0 if none.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shlex
import stat
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.runtime.errors import BuildError
from shoal.runtime.imageconfig import ImageHealthcheck

#: Instructions this builder runs; every other Dockerfile instruction is refused by name.
SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "LABEL",
             "ENTRYPOINT", "CMD", "HEALTHCHECK", "STOPSIGNAL", "VOLUME", "SHELL", "MAINTAINER")
KNOWN_UNSUPPORTED = ("ONBUILD",)
#: The instructions that take heredocs (BuildKit's).
HEREDOC_CMDS = ("RUN", "COPY", "ADD")
#: The shell of the shell form (RUN, CMD, ENTRYPOINT) until a SHELL changes it.
DEFAULT_SHELL = ("/bin/sh", "-c")


@dataclass(frozen=True)
class Heredoc:
    """A here-document of a RUN/COPY/ADD (``<<EOF`` ... ``EOF``), BuildKit's."""

    name: str  # the delimiter, unquoted: COPY's file name
    content: str  # the lines between the instruction and the delimiter, each with its "\n"
    expand: bool  # an unquoted delimiter: COPY expands the build's variables in it
    chomp: bool  # ``<<-``: leading tabs stripped from each line (and from the delimiter)

    def text(self) -> str:
        """The content, leading tabs stripped when ``chomp``."""
        if not self.chomp:
            return self.content
        return "".join(line.lstrip("\t") for line in self.content.splitlines(keepends=True))



@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line number of the instruction's first line
    cmd: str  # upper case: "RUN"
    args: str  # the rest, continuation lines joined, surrounding blanks stripped
    heredocs: tuple[Heredoc, ...] = ()  # RUN/COPY/ADD's here-documents, in line order

    def exec_form(self) -> list[str] | None:
        """The JSON array form (``["a", "b"]``), or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            raw = json.loads(text)
        except ValueError:
            return None  # Docker treats a bad JSON array as the shell form
        if isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            return raw
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments (``#`` first on a line) and blank lines skipped,
    ``\\`` at a line's end continues it (comment lines inside a continuation are dropped, as
    Docker does); a RUN/COPY/ADD's here-documents (``<<EOF``, ``<<-EOF``, ``<<'EOF'``, several
    on one line, read in order) are the lines that follow it up to each delimiter. Raise
    BuildError for an unknown or unsupported instruction, an unterminated heredoc, naming its
    line, and when there is no FROM first (ARGs may come before it). Each FROM starts a stage
    (shoal.runtime.buildstages splits them)."""
    out: list[Instruction] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        raw = lines[i]
        i += 1
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = [stripped]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            while i < len(lines) and lines[i].strip().startswith("#"):
                i += 1
            if i >= len(lines):
                break
            parts.append(lines[i].strip())
            i += 1
        joined = " ".join(p for p in (x.strip() for x in parts) if p)
        word, _, rest = joined.partition(" ")
        cmd = word.upper()
        if cmd not in SUPPORTED:
            what = "unsupported" if cmd in KNOWN_UNSUPPORTED else "unknown"
            raise BuildError(f"{what} instruction {word!r} (supported: {', '.join(SUPPORTED)})",
                             start + 1)
        docs: list[Heredoc] = []
        for name, expand_it, chomp in (heredoc_words(rest) if cmd in HEREDOC_CMDS else ()):
            body: list[str] = []
            while True:
                if i >= len(lines):
                    raise BuildError(f"{cmd}: unterminated heredoc <<{name} (no line {name})",
                                     start + 1)
                line = lines[i]
                i += 1
                if (line.lstrip("\t") if chomp else line) == name:
                    break
                body.append(line + "\n")
            docs.append(Heredoc(name, "".join(body), expand_it, chomp))
        out.append(Instruction(start + 1, cmd, rest.strip(), tuple(docs)))
    first = next((ins for ins in out if ins.cmd != "ARG"), None)
    if first is None or first.cmd != "FROM":
        raise BuildError("the Dockerfile must start with FROM (after optional ARGs)",
                         first.line if first else 0)
    return out


_HEREDOC_RE = re.compile(r"(\d*)<<(-?)([^<]+)")


def split_words(text: str) -> list[str]:
    """``text`` split at blanks outside quotes, each word as written (quotes and
    backslashes kept): how BuildKit finds a heredoc's ``<<WORD``."""
    words: list[str] = []
    cur = ""
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            cur += ch
            if ch == "\\" and quote == '"' and i + 1 < len(text):
                cur += text[i + 1]
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in " \t":
            if cur:
                words.append(cur)
            cur = ""
        else:
            cur += ch
            if ch in "'\"":
                quote = ch
            elif ch == "\\" and i + 1 < len(text):
                cur += text[i + 1]
                i += 1
        i += 1
    if cur:
        words.append(cur)
    return words


def heredoc_word(word: str) -> tuple[str, bool, bool] | None:
    """(delimiter, expand, chomp) of a ``<<WORD`` / ``<<-WORD`` / ``<<"WORD"`` word as
    written, else None; a quoted delimiter (any quote in it) means no expansion."""
    m = _HEREDOC_RE.fullmatch(word)
    if m is None:
        return None
    raw = m.group(3)
    name = re.sub(r"""['"\\]""", "", raw)
    if not name or any(c in name for c in " \t"):
        return None
    return name, not any(q in raw for q in "'\""), m.group(2) == "-"


def heredoc_words(args: str) -> list[tuple[str, bool, bool]]:
    """The heredocs an instruction's arguments open, in order (``heredoc_word``)."""
    return [h for h in map(heredoc_word, split_words(args)) if h is not None]


def parse_shell(ins: Instruction) -> tuple[str, ...]:
    """SHELL's ``["executable", "parameters"...]``: a non-empty JSON array of strings."""
    argv = ins.exec_form()
    if not argv:
        raise BuildError('SHELL needs a JSON array, e.g. SHELL ["/bin/bash", "-c"]', ins.line)
    return tuple(argv)


#: RUN --mount types shoal builds; BuildKit's ssh is refused by name.
MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret")
_MOUNT_KEYS = {"type", "target", "source", "from", "id", "sharing", "mode", "uid", "gid",
               "readonly", "rw", "size", "required", "env"}
#: a build secret's id (``--secret id=``, ``--mount=type=secret,id=``): BuildKit takes any
#: string; shoal a name that is also a file name and an environment variable's characters
SECRET_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MOUNT_ALIASES = {"dst": "target", "destination": "target", "src": "source", "ro": "readonly",
                  "readwrite": "rw", "tmpfs-size": "size"}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class RunMount:
    """One ``RUN --mount=...`` (BuildKit's), its values expanded."""

    type: str  # "bind" | "cache" | "tmpfs" | "secret"
    # absolute path in the RUN (a relative one is the WORKDIR's), normalised; secret: default
    # /run/secrets/ID, "" when only ``env=`` is given (no file then)
    target: str
    source: str = ""  # bind: a path of the context or of ``from``; cache: of ``from``
    from_: str = ""  # bind/cache: a stage (name or index) or an image; "" = the context
    id: str = ""  # cache: its name on the node; "" = the target; secret: the build's secret
    sharing: str = "shared"  # cache: "shared" | "private" | "locked"
    mode: int = 0o755  # cache: the new directory's mode; secret: the file's (default 0400)
    uid: int = 0  # cache: the new directory's owner; secret: the file's
    gid: int = 0
    readonly: bool = False  # bind: True unless ``rw``; cache: ``readonly``/``ro``
    size: int = 0  # tmpfs: bytes, 0 = the kernel's default
    required: bool = False  # secret: a build without it fails (else the mount is skipped)
    env: str = ""  # secret: also (or, without target=, only) this environment variable


def _flag_bool(key: str, value: str | None, line: int) -> bool:
    if value is None or value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BuildError(f"RUN --mount: {key}={value} is not true or false", line)


def parse_mount(spec: str, workdir: str, line: int) -> RunMount:
    """A ``--mount`` flag's value (``type=cache,target=/root/.cache,sharing=locked``) as a
    RunMount; BuildError naming the line for an unknown type or key, a missing target, a bad
    value. ``secret``: ``id`` (default the target's base name), ``target`` (default
    /run/secrets/ID), ``env``, ``required``, ``mode`` (default 0400), ``uid``, ``gid``
    (BuildKit's). ``ssh`` is refused (shoal's builder forwards no SSH agent)."""
    opts: dict[str, str | None] = {}
    for item in (f.strip() for f in spec.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = _MOUNT_ALIASES.get(key.lower(), key.lower())
        if key not in _MOUNT_KEYS:
            raise BuildError(f"RUN --mount: unknown option {key!r}", line)
        opts[key] = value if sep else None
    kind = opts.get("type") or "bind"
    if kind == "ssh":
        raise BuildError("RUN --mount=type=ssh is not supported: shoal's builder forwards no "
                         "SSH agent (use --mount=type=secret for a key or a token)", line)
    if kind == "secret":
        return _secret_mount(opts, workdir, line)
    if kind not in MOUNT_TYPES:
        raise BuildError(f"RUN --mount: unknown type {kind!r} (shoal builds "
                         f"{', '.join(MOUNT_TYPES)})", line)
    target = opts.get("target")
    if not target:
        raise BuildError(f"RUN --mount=type={kind} needs target=PATH", line)
    path = _mount_target(target, workdir, line)
    allowed = {"bind": {"source", "from", "readonly", "rw"},
               "cache": {"source", "from", "id", "sharing", "mode", "uid", "gid", "readonly"},
               "tmpfs": {"size"}}[kind] | {"type", "target"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise BuildError(f"RUN --mount=type={kind}: option {bad[0]!r} is not one of its "
                         f"({', '.join(sorted(allowed))})", line)
    sharing = opts.get("sharing") or "shared"
    if sharing not in ("shared", "private", "locked"):
        raise BuildError(f"RUN --mount: sharing={sharing} is not shared, private or locked",
                         line)
    try:
        mode = int(opts.get("mode") or "755", 8)
        uid, gid = int(opts.get("uid") or 0), int(opts.get("gid") or 0)
        size_text = (opts.get("size") or "0").strip().lower()
        m = re.fullmatch(r"(\d+)([bkmgt]?)b?", size_text)
        if m is None:
            raise ValueError(f"size={size_text} (e.g. 64m)")
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if not 0 <= mode <= 0o7777 or not 0 <= uid < 2**32 - 1 or not 0 <= gid < 2**32 - 1:
            raise ValueError("mode (octal, to 7777), uid and gid must be 0 to 4294967294")
    except ValueError as exc:
        raise BuildError(f"RUN --mount: bad value: {exc}", line) from None
    if kind == "bind":  # (read-only unless rw)
        readonly = not _flag_bool("rw", opts["rw"], line) if "rw" in opts else True
        if "readonly" in opts:
            readonly = _flag_bool("readonly", opts["readonly"], line)
    else:
        readonly = "readonly" in opts and _flag_bool("readonly", opts["readonly"], line)
    return RunMount(kind, path, (opts.get("source") or "").strip(), opts.get("from") or "",
                    opts.get("id") or "", sharing, mode, uid, gid, readonly, size)


def _mount_target(target: str, workdir: str, line: int) -> str:
    path = posixpath.normpath(posixpath.join("/", workdir or "/", target))
    if path.startswith("//"):
        path = path[1:]
    if path == "/" or "\0" in path or any(path == d or path.startswith(d + "/")
                                          for d in ("/proc", "/sys", "/dev")):
        raise BuildError(f"RUN --mount: target {target!r} cannot be / or under /proc, /sys, "
                         "/dev", line)
    return path


def _secret_mount(opts: Mapping[str, str | None], workdir: str, line: int) -> RunMount:
    """``--mount=type=secret,...`` (BuildKit's): its id, file, variable, owner and mode."""
    allowed = {"type", "id", "target", "env", "required", "mode", "uid", "gid"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise BuildError(f"RUN --mount=type=secret: option {bad[0]!r} is not one of its "
                         f"({', '.join(sorted(allowed))})", line)
    target, env = opts.get("target") or "", opts.get("env") or ""
    sid = opts.get("id") or posixpath.basename(target.rstrip("/"))
    if not SECRET_ID.fullmatch(sid):
        raise BuildError(f"RUN --mount=type=secret: id {sid!r} is not a secret id (letters, "
                         "digits, '_', '.', '-'; at most 128)" if sid else
                         "RUN --mount=type=secret needs id=NAME (or target=PATH)", line)
    if env and not _ENV_NAME.fullmatch(env):
        raise BuildError(f"RUN --mount=type=secret: env={env} is not a variable name", line)
    path = _mount_target(target or f"/run/secrets/{sid}", workdir, line) \
        if target or not env else ""
    try:
        mode = int(opts.get("mode") or "400", 8)
        uid, gid = int(opts.get("uid") or 0), int(opts.get("gid") or 0)
        if not 0 <= mode <= 0o7777 or not 0 <= uid < 2**32 - 1 or not 0 <= gid < 2**32 - 1:
            raise ValueError("mode (octal, to 7777), uid and gid must be 0 to 4294967294")
    except ValueError as exc:
        raise BuildError(f"RUN --mount: bad value: {exc}", line) from None
    required = "required" in opts and _flag_bool("required", opts["required"], line)
    return RunMount("secret", path, id=sid, mode=mode, uid=uid, gid=gid, readonly=True,
                    required=required, env=env)


def run_flags(ins: Instruction, env: Mapping[str, str] | None = None, workdir: str = "/"
              ) -> tuple[list[RunMount], str, str]:
    """A RUN's flags — ``--mount=`` (several), ``--network=`` (``default``, ``none``,
    ``host``) — and its command as written (shell or exec form); ``env``: the variables
    the flags' values are expanded with (None: not expanded, the planner's look for
    ``from=``). ``--security`` and other flags: BuildError naming the line."""
    mounts: list[RunMount] = []
    network = ""
    text = ins.args.strip()
    while text.startswith("--"):
        word = split_words(text)[0]
        text = text[len(word):].lstrip()
        try:
            [flag] = shlex.split(word)
        except ValueError:
            raise BuildError(f"RUN: bad flag {word}", ins.line) from None
        key, sep, value = flag[2:].partition("=")
        if env is not None:
            value = expand(value, env)
        if key == "mount" and sep:
            mounts.append(parse_mount(value, workdir, ins.line))
        elif key == "network" and value in ("default", "none", "host"):
            network = value
        else:
            raise BuildError(f"RUN: unsupported flag {flag} (shoal's RUN takes --mount= and "
                             "--network=default|none|host)", ins.line)
    targets = [m.target for m in mounts if m.target]
    if len(set(targets)) != len(targets):
        raise BuildError("RUN: two --mount on one target", ins.line)
    return mounts, network, text


_VAR_RE = re.compile(r"\\\$|\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Docker's variable substitution: ``$V``, ``${V}``, ``${V:-default}``, ``${V:+alt}``;
    ``\\$`` is a literal ``$``; an unset variable is empty."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        name = m.group(1) or m.group(4)
        value = env.get(name, "")
        if m.group(2) == "-":
            return value or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if value else ""
        return value

    return _VAR_RE.sub(sub, text)


def parse_volumes(ins: Instruction, args: str) -> list[str]:
    """VOLUME's paths: a JSON array (``["/data", "/logs"]``) or words (``/data /logs``),
    Docker's; each an absolute path (a task mounts an anonymous volume there), normalised."""
    paths = (Instruction(ins.line, ins.cmd, args).exec_form()
             if args.strip().startswith("[") else None) or args.split()
    if not paths:
        raise BuildError("VOLUME needs at least one path", ins.line)
    out = []
    for path in paths:
        norm = posixpath.normpath(path) if path.startswith("/") else ""
        norm = "/" + norm.lstrip("/")
        if not path.startswith("/") or norm == "/" or "\0" in path or "\n" in path:
            raise BuildError(f"VOLUME: {path!r} is not an absolute path (other than /)",
                             ins.line)
        out.append(norm)
    return out


def parse_pairs(args: str, line: int, what: str) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` (or the legacy ``K V with spaces`` when there is no ``=``)."""
    try:
        words = shlex.split(args, posix=True)
    except ValueError as exc:
        raise BuildError(f"{what}: {exc}", line) from None
    if not words:
        raise BuildError(f"{what} needs at least one KEY=VALUE", line)
    if "=" not in words[0]:
        key, _, value = args.strip().partition(" ")
        return [(key, value.strip())]
    out = []
    for w in words:
        key, sep, value = w.partition("=")
        if not sep or not key:
            raise BuildError(f"{what}: expected KEY=VALUE, got {w!r}", line)
        out.append((key, value))
    return out


def parse_healthcheck(args: str, line: int) -> ImageHealthcheck:
    """``HEALTHCHECK [--interval=D --timeout=D --start-period=D --retries=N] CMD ...`` or
    ``HEALTHCHECK NONE``; durations like 30s, 1m30s, 500ms."""
    text = args.strip()
    if text.upper() == "NONE":
        return ImageHealthcheck(test=("NONE",))
    opts: dict[str, str] = {}
    while text.startswith("--"):
        word, _, text = text.partition(" ")
        key, sep, value = word[2:].partition("=")
        if not sep or key not in ("interval", "timeout", "start-period", "retries"):
            raise BuildError(f"HEALTHCHECK: unknown option {word}", line)
        opts[key] = value
        text = text.strip()
    word, _, rest = text.partition(" ")
    if word.upper() != "CMD" or not rest.strip():
        raise BuildError("HEALTHCHECK needs CMD COMMAND or NONE", line)
    argv = Instruction(line, "CMD", rest).exec_form()
    test = ("CMD", *argv) if argv is not None else ("CMD-SHELL", rest.strip())
    try:
        retries = int(opts.get("retries", "0"))
        return ImageHealthcheck(test=test, interval=_duration(opts.get("interval", "0")),
                                timeout=_duration(opts.get("timeout", "0")),
                                start_period=_duration(opts.get("start-period", "0")),
                                retries=retries)
    except ValueError as exc:
        raise BuildError(f"HEALTHCHECK: {exc}", line) from None


def _duration(text: str) -> float:
    if text in ("", "0"):
        return 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(a + u for a, u in parts) != text:
        raise ValueError(f"bad duration {text!r} (e.g. 30s, 1m30s)")
    return sum(float(a) * units[u] for a, u in parts)


def context_sources(ctx: Path, files: Sequence[str], ins: Instruction, args: str
                    ) -> tuple[list[tuple[str, str, bool]], str]:
    """A COPY/ADD's [(context path, path in the image, extract it: ADD of a tar)] and a
    digest of their names, modes and content (its build-cache part); ``files``: what
    ``context_files`` gives, ``args``: the instruction's, expanded."""
    argv = ins.exec_form()
    if argv is None:
        try:
            argv = shlex.split(args)
        except ValueError as exc:
            raise BuildError(f"{ins.cmd}: {exc}", ins.line) from None
    flags = [a for a in argv if a.startswith("--")]
    argv = [a for a in argv if not a.startswith("--")]
    for flag in flags:  # (--link: BuildKit's cache hint; the files are the same)
        if not flag.startswith(("--chown=", "--link=")) and flag != "--link":
            raise BuildError(f"{ins.cmd}: unsupported flag {flag}", ins.line)
    if len(argv) < 2:
        raise BuildError(f"{ins.cmd} needs a source and a destination", ins.line)
    *srcs, dest = argv
    fileset = set(files)
    out: list[tuple[str, str, bool]] = []  # (context path, path in image, extract it)
    for src in srcs:
        if "://" in src:
            raise BuildError(f"{ins.cmd} from a URL is not supported: {src}", ins.line)
        pat = posixpath.normpath(src.lstrip("/"))
        if pat.startswith(".."):
            raise BuildError(f"{ins.cmd}: {src} is outside the build context", ins.line)
        matches = [""] if pat == "." else [f for f in files
                                           if fnmatch.fnmatchcase(f, pat)]
        if not matches:
            raise BuildError(f"{ins.cmd}: {src} not found in the build context "
                             "(or excluded by .dockerignore)", ins.line)
        many = len(srcs) > 1 or len(matches) > 1 or dest.endswith("/")
        for m in matches:
            full = ctx / m if m else ctx
            if full.is_dir() and not full.is_symlink():
                below = [f for f in files if m == "" or f.startswith(m + "/")]
                for f in below:
                    rel = f[len(m) + 1:] if m else f
                    out.append((f, posixpath.join(dest, rel), False))
                if m:
                    out.append((m, dest, False))
            elif ins.cmd == "ADD" and inside(ctx, full) and full.is_file() \
                    and tarfile.is_tarfile(full):
                out.append((m, dest.rstrip("/") or "/", True))  # extracted into dest
            else:
                target = posixpath.join(dest, posixpath.basename(m)) if many else dest
                out.append((m, target, False))
                if m not in fileset:
                    raise BuildError(f"{ins.cmd}: {src} is excluded", ins.line)
    sha = hashlib.sha256(json.dumps(flags).encode())
    for rel, target, unpack in sorted(out):
        hash_entry(sha, ctx / rel, f"{rel}\0{target}\0{unpack}")
    return out, sha.hexdigest()


def hash_entry(sha: Any, path: Path, label: str) -> None:
    """Add one context entry to a cache key's ``sha``: ``label``, its mode, and its content
    (a regular file's bytes, a symlink's target; not followed)."""
    st = path.lstat()
    sha.update(f"{label}\0{st.st_mode:o}\0".encode())
    if stat.S_ISREG(st.st_mode):
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
    elif stat.S_ISLNK(st.st_mode):
        sha.update(os.readlink(path).encode())


def inside(ctx: Path, path: Path) -> bool:
    """Whether ``path``, its symlinks followed, is in the context directory ``ctx`` (the
    agent unpacks a context's symlinks as they are: one out of it names an agent's file)."""
    real, root = os.path.realpath(path), os.path.realpath(ctx)
    return real == root or real.startswith(root + "/")


# ------------------------------------------------------------------------------ .dockerignore


def read_dockerignore(text: str) -> list[tuple[bool, str]]:
    """(negated, pattern) per line; comments and blanks skipped, patterns cleaned."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        out.append((neg, pat))
    return out


def ignored(rel: str, patterns: Sequence[tuple[bool, str]]) -> bool:
    """Whether a context path is excluded: the last matching pattern wins; a pattern matching a
    parent directory excludes what is below it; ``**`` matches any number of directories."""
    result = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for neg, pat in patterns:
        rx = _glob_re(pat)
        if any(rx.fullmatch(p) for p in prefixes):
            result = not neg
    return result


def _glob_re(pat: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pat.startswith("**", i):
            out += ".*"
            i += 2
        else:
            ch = pat[i]
            out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
            i += 1
    return re.compile(out)


def context_files(ctx: Path | str, contained: bool = False) -> list[str]:
    """Every path of the context (relative, sorted) that .dockerignore does not exclude.
    ``contained``: the agent's look at a context it unpacked, whose .dockerignore is read
    only when it is a regular file inside it (a symlink out of it, a FIFO: never)."""
    path = Path(ctx) / ".dockerignore"
    try:
        ok = not contained or (inside(Path(ctx), path) and path.is_file())
        patterns = read_dockerignore(path.read_text(errors="replace")) if ok else []
    except FileNotFoundError:
        patterns = []
    out = []
    for root, dirs, files in os.walk(ctx):
        for name in sorted(dirs) + sorted(files):
            rel = os.path.relpath(os.path.join(root, name), ctx)
            if not ignored(rel, patterns):
                out.append(rel)
        dirs.sort()
    return sorted(out)
