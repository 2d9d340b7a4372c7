"""``shoal image build``: a Dockerfile subset built into this node's image store.

Owns: executing a parsed Dockerfile — the build-cache keys (pure), the builder (which runs each
RUN as a task of the runtime and turns its overlay upper dir into a layer) and
``DATA_DIR/build/tmp/`` (contexts and layer tarballs in progress); the step cache it reads and
writes (``cache.json``: cache key -> the step's image, its parent, when it was made and last
hit) and what ``builder prune`` removes are shoal.runtime.buildcache's. Must not touch: the
image store's files (it goes through ImageStore's public methods: ``inspect``, ``import_blob``,
``add_image``, ``commit``), cluster state, the runtime's other tasks. Reading Dockerfiles and
.dockerignore is shoal.runtime.dockerfile's (pure; its names are re-exported here); splitting
stages and reading another image's files for ``COPY --from`` is shoal.runtime.buildstages'.

Multi-stage: each FROM starts a stage, built in file order from its image or from an earlier
stage's result; ``--target`` picks the result (default the last stage) and only the stages
it uses are built (BuildKit's), the others skipped with a line saying so. A stage's result
is an untagged image like any intermediate one; ``COPY --from=STAGE|INDEX|IMAGE`` takes
files from it (or from an image, the node's or pulled, as FROM) — its cache key holds that
image's id, so a changed earlier stage is a miss there and an unchanged one a hit. BuildKit's
automatic platform ARGs (``TARGETARCH``...) are this node's: it builds for its own platform.

Every instruction makes an image (untagged, like Docker's intermediate images): FROM the base,
RUN/COPY/ADD one more layer, the others a new config over the same layers. The image id is the
manifest's digest, so a built image is a normal image: services run it and peers fetch it blob by
blob like any other. The cache maps ``sha256(parent image id, instruction, its expanded
arguments, the build args in scope, the digests of the files COPY/ADD take from the context
or the id of COPY --from's image)`` to the image that step made; a hit reuses it (nothing is
made), so an unchanged rebuild creates no layer and no manifest. A cached image that was
removed (``image prune``) is a miss.

RUN: a task (``TaskConfig``: the parent image, the stage's SHELL — ``/bin/sh -c`` until a
SHELL — with CMD, or the exec form, the image's Env + the build args in scope, WorkingDir,
User) started and waited for through the runtime's Controller interface; its output is
streamed; a non-zero exit fails the build. Its ``--mount``s (cache, bind, tmpfs, secret:
the build's ``--secret``s, ``BuildOptions.secrets``, read from the request by
``read_secrets`` and held in memory only), heredocs
and the mount points to leave out of its layer are shoal.runtime.buildmounts'; a RUN's cache
key holds its mounts' options and what its binds take, and a heredoc's text. Its network is
the build's ``--network`` (shoal.runtime.buildnet): by default the node's task network, with an
address for the RUN's lifetime, outbound NAT and the node's DNS, as Docker's builder gives its
default bridge (``apt-get install``, ``pip install`` work); ``none``: only ``lo``; ``host``:
the node's. The attaching is the agent's, given as a ``RunNetwork``. Its upper dir becomes a
layer tarball in the Docker/OCI form (overlayfs whiteouts -> ``.wh.NAME``, opaque dirs ->
``.wh..wh..opq``), which the store unpacks back into the overlay form.

Errors::

    ImageError (shoal.runtime.errors)
    └── BuildError        a bad Dockerfile (``line`` = its line number, 0 if none), a missing
                          context file, a RUN that failed, a base image that cannot be had
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import posixpath
import re
import secrets
import shlex
import stat
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.runtime.buildcache import StepCache, holding
from shoal.runtime.buildmounts import (
    copy_heredocs,
    mount_digest,
    remove_stubs,
    run_argv,
    run_mounts,
    secret_files,
    stub_paths,
    stubs_in_mounts,
)
from shoal.runtime.buildnet import RunNetwork
from shoal.runtime.buildstages import (
    LayeredFS,
    Stage,
    check_mount_from,
    needed,
    plan_stages,
    platform_args,
    stage_sources,
    target_stage,
)
from shoal.runtime.dockerfile import DEFAULT_SHELL, RunMount, parse_shell, run_flags, split_words
from shoal.runtime.dockerfile import SUPPORTED as SUPPORTED
from shoal.runtime.dockerfile import Instruction as Instruction
from shoal.runtime.dockerfile import context_files as context_files
from shoal.runtime.dockerfile import context_sources as context_sources
from shoal.runtime.dockerfile import expand as expand
from shoal.runtime.dockerfile import ignored as ignored
from shoal.runtime.dockerfile import inside as inside
from shoal.runtime.dockerfile import parse_dockerfile as parse_dockerfile
from shoal.runtime.dockerfile import parse_healthcheck as parse_healthcheck
from shoal.runtime.dockerfile import parse_pairs as parse_pairs
from shoal.runtime.dockerfile import parse_volumes as parse_volumes
from shoal.runtime.dockerfile import read_dockerignore as read_dockerignore
from shoal.runtime.errors import BuildError, ImageError, ImageNotFound
from shoal.runtime.images import ImageConfig, ImageInfo, ImageStore
from shoal.runtime.layers import is_opaque
from shoal.runtime.records import BUILD_TASK_PREFIX, RunState, TaskConfig
from shoal.runtime.registry import host_platform
from shoal.runtime.rootfs import read_rootfs_file, resolve_user

_ACTIVE: set[str] = set()  # RUN tasks of builds in progress in this process

def cache_key(parent: str, ins: Instruction, expanded: str, build_args: Mapping[str, str],
              files: str = "") -> str:
    """The layer-cache key of one step: the parent image id, the instruction and its
    expanded arguments, the build args in scope (they reach RUN's environment) and, for
    COPY/ADD, the digest of the files taken from the context."""
    docs = [[[h.name, h.content, h.expand, h.chomp] for h in ins.heredocs]] if ins.heredocs \
        else []  # (their text is the instruction's too)
    blob = json.dumps([parent, ins.cmd, expanded, sorted(build_args.items()), files, *docs])
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------- builder


@dataclass
class BuildOptions:
    tags: tuple[str, ...] = ()  # NAME:TAG given with -t (several allowed)
    dockerfile: str = "Dockerfile"  # relative to the context
    build_args: dict[str, str] = field(default_factory=dict)  # --build-arg K=V
    no_cache: bool = False  # --no-cache: run every step, record the new results
    # --label K=V: labels of the result, as a last LABEL step (Docker's `build --label`;
    # Compose's build.labels)
    labels: dict[str, str] = field(default_factory=dict)
    # --target NAME: build up to that stage (its name, any case) and make it the result;
    # "": the last stage. Only the stages it uses are built.
    target: str = ""
    # --network: RUN's network, "default" | "none" | "host" (shoal.runtime.buildnet)
    network: str = "default"
    # --secret: id -> its bytes, for RUN --mount=type=secret (kept in memory only; never in
    # a repr, a log, the cache key, a layer or the image config)
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass
class BuildResult:
    image: ImageInfo
    steps: int = 0
    cached: int = 0  # steps whose result came from the cache
    layers_created: int = 0  # new layer blobs stored by this build
    images_created: int = 0  # new images (manifests) made by this build


@dataclass
class _State:
    image: str  # current image id ("" = scratch, nothing yet)
    layers: list[tuple[str, int]]
    config: ImageConfig
    labels: dict[str, str]
    args: dict[str, str]  # ARGs in scope (name -> value)
    held: set[str] = field(default_factory=set)  # the build's images (buildcache.holding)


Pull = Callable[[str], Awaitable[ImageInfo]]
Emit = Callable[[str], None]


class Builder:
    """Builds images with ``runtime`` (a Controller: start/status/read_logs/logs_path/remove,
    from the agent's event loop) into ``store``; ``pull`` fetches a FROM image that is not
    here (None: only local images); ``network`` attaches a RUN of network mode ``default``
    to the node's task network (None: such a RUN has only ``lo``)."""

    def __init__(self, runtime: Any, store: ImageStore, data_dir: Path,
                 pull: Pull | None = None, run_timeout: float = 3600.0,
                 network: RunNetwork | None = None) -> None:
        self.runtime = runtime
        self.network = network
        self.store = store
        self.dir = Path(data_dir)
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pull = pull
        self.run_timeout = run_timeout
        self.steps = StepCache(self.dir)

    # -- cache (shoal.runtime.buildcache's StepCache)

    def _cached(self, key: str) -> ImageInfo | None:
        image_id = self.steps.get(key)
        if image_id is None:
            return None
        try:
            info = self.store.inspect(image_id)
        except ImageError:
            return None
        self.steps.touch(key)
        return info

    # -- the build

    async def build(self, ctx: Path, opts: BuildOptions, emit: Emit) -> BuildResult:
        """Build the Dockerfile of context directory ``ctx``; ``emit`` gets output lines.
        The images it stands on meanwhile are held (``builder prune`` leaves them)."""
        with holding() as held:
            return await self._build(ctx, opts, emit, held)

    async def _build(self, ctx: Path, opts: BuildOptions, emit: Emit, held: set[str]
                     ) -> BuildResult:
        import asyncio

        path = ctx / opts.dockerfile  # (a symlink out: the agent's file; a FIFO: no end)
        if not inside(ctx, path) or (os.path.lexists(path) and not path.is_file()):
            raise BuildError(f"the Dockerfile {opts.dockerfile} is not a file of the build "
                             "context", field="dockerfile")
        try:
            text = (ctx / opts.dockerfile).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BuildError(f"cannot read the Dockerfile {opts.dockerfile}: {exc}") from None
        instructions = parse_dockerfile(text)
        used_args: set[str] = set()
        # ARGs before the first FROM (FROM lines, a stage's ARG NAME), BuildKit's TARGETARCH...
        meta_args = platform_args(*host_platform())
        leading = list(itertools.takewhile(lambda i: i.cmd == "ARG", instructions))
        for ins in leading:
            name, value = self._arg(ins, opts.build_args, meta_args, used_args)
            meta_args[name] = value
        stages = plan_stages(instructions, meta_args,  # (every stage error before any step)
                             "/".join(p for p in host_platform() if p))
        target = target_stage(stages, opts.target)
        wanted = needed(stages, target)
        if opts.labels:  # (quoted, `$` escaped: a value is taken as given, not expanded)
            stages[target].instructions.append(Instruction(line=0, cmd="LABEL", args=" ".join(
                shlex.quote(f"{k}={v}".replace("$", "\\$"))
                for k, v in sorted(opts.labels.items()))))
        for tid in [t for t in self.runtime.tasks() if t.startswith(BUILD_TASK_PREFIX)
                    and t not in _ACTIVE]:  # a RUN left by a build an agent restart cut short
            with contextlib.suppress(Exception):
                await self.runtime.remove(tid)
            if self.network is not None:  # (its address, if it had one)
                with contextlib.suppress(Exception):
                    await self.network.detach(tid)
        files = await asyncio.to_thread(context_files, ctx, True)
        result = BuildResult(image=None)  # type: ignore[arg-type]
        total = len(leading) + sum(1 + len(s.instructions) for s in stages if s.index in wanted)
        n = 0
        for ins in leading:
            n += 1
            emit(f"Step {n}/{total} : {ins.cmd} {ins.args}")
        done: dict[int, _State] = {}  # the stages built so far: their last state
        # COPY --from's images by stage index or reference: their ids ("": scratch); an
        # image's had before any step (as BuildKit), so a missing one fails the build early
        froms: dict[int | str, str] = {}
        for stage in stages:
            for ins, ref in [*stage.copy_from.items(), *((i, r) for i, m in
                                                          stage.mount_from.items()
                                                          for r in m.values())]:
                if stage.index in wanted and isinstance(ref, str) and ref not in froms:
                    info = await self._image(ref, ins, f"COPY --from={ref} (no stage has "
                                             "that name)", emit)
                    froms[ref] = info.id if info is not None else ""
                    held.add(froms[ref])
        for stage in stages[:target + 1]:
            if stage.index not in wanted:  # (BuildKit's: what the target does not use)
                emit(f"Skipping stage {stage.label} (line {stage.from_ins.line}): "
                     f"stage {stages[target].label} does not use it")
                continue
            n += 1
            emit(f"Step {n}/{total} : FROM {stage.from_ins.args}")
            st = await self._stage_base(stage, stages, done, emit, held)
            result.steps += 1
            for ins in stage.instructions:
                n += 1
                emit(f"Step {n}/{total} : {ins.cmd} {ins.args}")
                await self._step(ctx, files, ins, stage, st, froms, opts,
                                 (meta_args, used_args), result, emit)
            done[stage.index] = st
            froms[stage.index] = st.image
        st = done[target]
        unused = set(opts.build_args) - used_args
        if unused:
            emit(f"[Warning] build args not consumed by any ARG: {', '.join(sorted(unused))}")
        if not st.image:
            raise BuildError("nothing to build: FROM scratch with no layer and no config")
        info = await asyncio.to_thread(self.store.commit, st.image, list(opts.tags))
        result.image = info
        emit(f"Successfully built {info.id[7:19]}")
        for tag in info.tags:
            if tag in {self._norm(t) for t in opts.tags}:
                emit(f"Successfully tagged {tag}")
        return result

    async def _stage_base(self, stage: Stage, stages: Sequence[Stage],
                          done: Mapping[int, _State], emit: Emit, held: set[str]) -> _State:
        """A stage's state after its FROM: an earlier stage's result (its ARGs too, as
        BuildKit's), else the image."""
        if stage.base_stage is not None:
            parent = done[stage.base_stage]
            emit(f" ---> {parent.image[7:19] or 'scratch'} (stage "
                 f"{stages[stage.base_stage].label})")
            return _State(parent.image, list(parent.layers), parent.config,
                          dict(parent.labels), dict(parent.args), parent.held)
        st = _State("", [], ImageConfig(), {}, {}, held)
        info = await self._image(stage.base, stage.from_ins, f"FROM {stage.base}", emit)
        if info is not None:
            self._adopt(st, info)
            emit(f" ---> {info.id[7:19]}")
        return st

    async def _step(self, ctx: Path, files: Sequence[str], ins: Instruction, stage: Stage,
                    st: _State, froms: Mapping[int | str, str], opts: BuildOptions,
                    args: tuple[Mapping[str, str], set[str]], result: BuildResult,
                    emit: Emit) -> None:
        """One instruction after a FROM, on ``st``: from the cache, or run; ``froms``: COPY
        --from's image ids; ``args``: the global ARGs' values and the build args consumed so
        far."""
        import asyncio

        result.steps += 1
        env = {**st.args, **st.config.env}
        if ins.cmd == "ARG":
            # (a bare `ARG NAME` in a stage takes the value of the global ARG NAME)
            name, value = self._arg(ins, opts.build_args, {**args[0], **st.args}, args[1])
            st.args[name] = value
            emit(" ---> (build arg)")
            return
        expanded = ins.args if ins.cmd in ("RUN", "CMD", "ENTRYPOINT", "HEALTHCHECK", "SHELL",
                                           "MAINTAINER") else expand(ins.args, env)
        sources: list[tuple[str, str, bool]] = []
        digest = ""
        source: ImageInfo | None = None  # COPY --from's image
        with contextlib.ExitStack() as cleanup:
            if ins.cmd == "RUN":  # (its mounts' options and what they bind)
                mounts = check_mount_from(ins, run_flags(ins, env, st.config.workdir or "/")[0],
                                          stage)
                ids = {m.from_: froms.get(stage.mount_from.get(ins, {}).get(m.from_, ""), "")
                       for m in mounts if m.from_}
                digest = await asyncio.to_thread(mount_digest, ctx, mounts, ids, ins.line)
            elif ins in stage.copy_from:  # (its image id stands for its files)
                digest = froms[stage.copy_from[ins]] or "scratch"
                source = self.store.inspect(digest) if digest != "scratch" else None
            elif ins.cmd in ("COPY", "ADD"):
                rest, digest = expanded, ""
                if ins.heredocs:  # (written out, then taken as absolute paths)
                    into = Path(tempfile.mkdtemp(dir=self.tmp, prefix="heredoc-"))
                    cleanup.callback(_rmtree, into)
                    rest, sources, digest = copy_heredocs(ins, ins.args, env, into)
                if not ins.heredocs or any(not w.startswith("--")
                                           for w in split_words(rest)[:-1]):
                    more, more_digest = await asyncio.to_thread(context_sources, ctx, files,
                                                                ins, rest)
                    sources, digest = sources + more, digest + more_digest
            await self._step_run(ctx, ins, stage, st, expanded, sources, source, digest,
                                 froms, opts, result, emit)

    async def _step_run(self, ctx: Path, ins: Instruction, stage: Stage, st: _State,
                        expanded: str, sources: list[tuple[str, str, bool]],
                        source: ImageInfo | None, digest: str,
                        froms: Mapping[int | str, str], opts: BuildOptions,
                        result: BuildResult, emit: Emit) -> None:
        """A step's cache look-up, else its work (``_step`` read what it takes)."""
        import asyncio

        key = cache_key(st.image, ins, expanded, st.args, digest)
        hit = None if opts.no_cache else self._cached(key)
        if hit is not None:
            emit(f" ---> Using cache {hit.id[7:19]}")
            result.cached += 1
            self._adopt(st, hit)
            return
        new_layer: tuple[str, int] | None = None
        if ins.cmd == "RUN":
            new_layer = await self._run(ins, st, emit, opts, ctx, stage, froms)
        elif ins.cmd in ("COPY", "ADD"):
            if ins in stage.copy_from:
                layers = self.store.layer_dirs(source) if source is not None else []
                sources = await asyncio.to_thread(stage_sources, layers, ins, expanded,
                                                  str(stage.copy_from[ins]))
            new_layer = await asyncio.to_thread(self._copy_layer, ctx, ins, st, expanded,
                                                sources, ins in stage.copy_from)
        else:
            self._config_step(ins, st, expanded)
            if ins.cmd == "WORKDIR":  # created when missing, as Docker does
                new_layer = await asyncio.to_thread(self._workdir_layer, st)
        if new_layer is not None:
            result.layers_created += 1
            st.layers.append(new_layer)
        config = replace(st.config, labels=dict(st.labels))
        before = {i.id for i in await asyncio.to_thread(self.store.ls)}
        info = await asyncio.to_thread(self.store.add_image, st.layers, config)
        result.images_created += info.id not in before
        st.held.add(info.id)
        self.steps.put(key, info.id, st.image)
        st.image = info.id
        emit(f" ---> {info.id[7:19]}")

    @staticmethod
    def _norm(tag: str) -> str:
        from shoal.runtime.images import normalize_ref

        return normalize_ref(tag)

    def _adopt(self, st: _State, info: ImageInfo) -> None:
        st.held.add(info.id)
        st.image = info.id
        st.layers = [(d, self._blob_size(d)) for d in info.layers]
        st.config = info.config
        st.labels = dict(info.config.labels)

    def _blob_size(self, digest: str) -> int:
        with self.store.export_blob(digest) as fh:
            return os.fstat(fh.fileno()).st_size

    @staticmethod
    def _arg(ins: Instruction, build_args: Mapping[str, str], scope: Mapping[str, str],
             used: set[str]) -> tuple[str, str]:
        name, sep, default = ins.args.strip().partition("=")
        if not re.fullmatch(r"\w+", name):
            raise BuildError(f"ARG: bad name {name!r}", ins.line)
        if name in build_args:
            used.add(name)
            return name, build_args[name]
        return name, expand(default.strip().strip('"'), scope) if sep else scope.get(name, "")

    async def _image(self, ref: str, ins: Instruction, what: str, emit: Emit
                     ) -> ImageInfo | None:
        """The image ``ref`` names (FROM's, COPY --from's): this node's, else pulled; None
        for ``scratch``."""
        import asyncio

        if ref == "scratch":
            return None
        try:
            return await asyncio.to_thread(self.store.inspect, ref)
        except ImageNotFound:
            if self.pull is None:
                raise BuildError(f"{what}: no such image on this node", ins.line) from None
            emit(f" ---> pulling {ref}")
            try:
                return await self.pull(ref)
            except Exception as exc:  # any pull failure: the build fails with its message
                raise BuildError(f"{what}: {exc}", ins.line) from None

    def _config_step(self, ins: Instruction, st: _State, args: str) -> None:
        cfg = st.config
        line = ins.line
        if ins.cmd == "ENV":
            env = dict(cfg.env)
            env.update(parse_pairs(args, line, "ENV"))
            cfg = replace(cfg, env=env)
        elif ins.cmd == "LABEL":
            st.labels.update(parse_pairs(args, line, "LABEL"))
        elif ins.cmd == "WORKDIR":
            path = posixpath.normpath(posixpath.join(cfg.workdir or "/", args.strip()))
            cfg = replace(cfg, workdir=path)
        elif ins.cmd == "USER":
            if not args.strip():
                raise BuildError("USER needs a user", line)
            cfg = replace(cfg, user=args.strip())
        elif ins.cmd == "EXPOSE":
            ports = set(cfg.exposed_ports)
            for word in args.split():
                port, _, proto = word.partition("/")
                proto = proto.lower() or "tcp"
                if not port.isdigit() or not 1 <= int(port) <= 65535 or proto not in ("tcp",
                                                                                     "udp"):
                    raise BuildError(f"EXPOSE: bad port {word!r}", line)
                ports.add((int(port), proto))
            cfg = replace(cfg, exposed_ports=tuple(sorted(ports)))
        elif ins.cmd == "SHELL":  # (the shell form's from here on; Docker's config Shell)
            cfg = replace(cfg, shell=parse_shell(ins))
        elif ins.cmd == "MAINTAINER":  # (deprecated; Docker's Author)
            cfg = replace(cfg, author=args.strip())
        elif ins.cmd in ("CMD", "ENTRYPOINT"):
            argv = ins.exec_form()
            if argv is None:
                argv = [*(cfg.shell or DEFAULT_SHELL), args] if args.strip() else []
            cfg = replace(cfg, cmd=tuple(argv)) if ins.cmd == "CMD" else \
                replace(cfg, entrypoint=tuple(argv), cmd=())
        elif ins.cmd == "HEALTHCHECK":
            cfg = replace(cfg, healthcheck=parse_healthcheck(args, line))
        elif ins.cmd == "VOLUME":  # (recorded in the config, as Docker's: Volumes)
            paths = set(cfg.volumes) | set(parse_volumes(ins, args))
            cfg = replace(cfg, volumes=tuple(sorted(paths)))
        elif ins.cmd == "STOPSIGNAL":
            if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", args.strip()):
                raise BuildError(f"STOPSIGNAL: bad signal {args!r}", line)
            cfg = replace(cfg, stop_signal=args.strip())
        st.config = cfg

    # -- COPY / ADD

    def _copy_layer(self, ctx: Path, ins: Instruction, st: _State, args: str,
                    sources: Sequence[tuple[str, str, bool]], keep_owner: bool = False
                    ) -> tuple[str, int]:
        """The layer of a COPY/ADD: ``sources`` are context paths, or absolute paths of
        another image's files (COPY --from, which ``keep_owner`` unless --chown, as
        BuildKit; a context's files are root's)."""
        argv = ins.exec_form() or shlex.split(args)
        chown = next((a.split("=", 1)[1] for a in argv if a.startswith("--chown=")), "")
        uid = gid = 0
        lower = self._lower_dirs(st)
        if chown:
            try:
                user = resolve_user(chown, read_rootfs_file(lower, "etc/passwd"),
                                    read_rootfs_file(lower, "etc/group"))
            except ValueError as exc:
                raise BuildError(f"{ins.cmd} --chown: {exc}", ins.line) from None
            uid, gid = user.uid, user.gid
        workdir = st.config.workdir or "/"
        entries: dict[str, str] = {}  # path in image -> context path
        archives: list[tuple[str, str]] = []  # (context path, directory in image) of ADD
        for rel, target, unpack in sources:
            path = posixpath.normpath(posixpath.join(workdir, target)).lstrip("/")
            if unpack:
                archives.append((rel, "" if path == "." else path))
                continue
            if path in ("", "."):
                continue
            if (ctx / rel).is_file() and _image_dir(lower, path, follow=False):
                path = posixpath.join(path, posixpath.basename(rel))  # into an existing dir
            entries[path] = rel
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="layer-", suffix=".tar")
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                done: set[str] = set()
                for path in sorted(entries):
                    self._parents(tar, path, lower, done)
                    info = tar.gettarinfo(str(ctx / entries[path]), arcname=path)
                    if chown or not keep_owner:
                        info.uid, info.gid = uid, gid
                    info.uname = info.gname = ""
                    done.add(path)
                    if info.isreg():
                        with (ctx / entries[path]).open("rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
                for rel, into in archives:
                    self._add_archive(tar, ctx / rel, into, lower, done)
            return self._store_layer(Path(tmp))
        except OSError as exc:
            raise BuildError(f"{ins.cmd}: {exc}", ins.line) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _add_archive(self, tar: tarfile.TarFile, archive: Path, into: str,
                     lower: Sequence[Path], done: set[str]) -> None:
        """ADD of a local tar (plain, gzip; zstd not): its members below ``into``. Members
        with absolute or ``..`` names are refused (the store's extraction checks links)."""
        if into:
            self._parents(tar, into + "/.", lower, done)
        with tarfile.open(archive, "r:*") as src:
            for member in src:
                name = posixpath.normpath(member.name.lstrip("/"))
                if name == ".":
                    continue
                if name.startswith(".."):
                    raise BuildError(f"ADD {archive.name}: unsafe member {member.name!r}")
                new = posixpath.join(into, name) if into else name
                self._parents(tar, new, lower, done)
                done.add(new)
                member.name = new
                if member.islnk():
                    member.linkname = posixpath.join(into, posixpath.normpath(
                        member.linkname.lstrip("/"))) if into else member.linkname
                fh = src.extractfile(member) if member.isreg() else None
                tar.addfile(member, fh)

    @staticmethod
    def _parents(tar: tarfile.TarFile, path: str, lower: Sequence[Path], done: set[str]
                 ) -> None:
        """Directory entries for the parents of ``path`` not yet in the tarball, with the
        mode and owner they have in the parent image (0755 root when new)."""
        parts = path.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            d = "/".join(parts[:n])
            if d in done:
                continue
            done.add(d)
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            found = LayeredFS(lower).lookup("/" + d, follow=False)  # (no host path)
            s = os.lstat(found[1][0]) if found is not None and found[1] else None
            if s is not None and stat.S_ISDIR(s.st_mode):
                info.mode, info.uid, info.gid = stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid
                info.mtime = int(s.st_mtime)
            tar.addfile(info)

    def _workdir_layer(self, st: _State) -> tuple[str, int] | None:
        """A layer holding the WORKDIR (and its parents) if the image lacks it, else None."""
        path = st.config.workdir.strip("/")
        lower = self._lower_dirs(st)
        if not path or _image_dir(lower, path):
            return None
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="layer-", suffix=".tar")
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                self._parents(tar, path + "/.", lower, set())
            return self._store_layer(Path(tmp))
        finally:
            os.unlink(tmp)

    def _lower_dirs(self, st: _State) -> list[Path]:
        if not st.image:
            return []
        return self.store.layer_dirs(self.store.inspect(st.image))

    def _store_layer(self, tarball: Path) -> tuple[str, int]:
        sha = hashlib.sha256()
        with tarball.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
        digest = f"sha256:{sha.hexdigest()}"
        with tarball.open("rb") as fh:
            size = self.store.import_blob(digest, fh)
        return digest, size

    # -- RUN

    async def _run(self, ins: Instruction, st: _State, emit: Emit, opts: BuildOptions,
                   ctx: Path, stage: Stage, froms: Mapping[int | str, str]
                   ) -> tuple[str, int] | None:
        """A RUN as a task, its mounts (shoal.runtime.buildmounts) made for it; its layer."""
        import asyncio

        network = opts.network
        if not st.layers:
            raise BuildError("RUN needs a base image with a shell (not FROM scratch)", ins.line)
        mounts, run_net, command = run_flags(ins, {**st.args, **st.config.env},
                                             st.config.workdir or "/")
        mounts = check_mount_from(ins, mounts, stage)  # (from=: as the stages were planned)
        if run_net == "host" and network != "host":
            raise BuildError("RUN --network=host needs the build's --network host", ins.line)
        network = {"": network, "default": network}.get(run_net, run_net)
        argv, script = run_argv(ins, command, st.config.shell)
        if not argv or not command.strip():
            raise BuildError("RUN needs a command", ins.line)
        task_id = f"{BUILD_TASK_PREFIX}{secrets.token_hex(8)}"
        net = self.network if network == "default" else None
        files: dict[str, Any] = {}
        if self.network is not None and network != "none":
            try:  # (its resolv.conf: the node's DNS server, on the host's network too)
                files = dict(self.network.files())
            except Exception as exc:  # no task network on this node
                if net is not None:
                    raise BuildError(f"RUN: {exc}: build with --network none or host",
                                     ins.line) from None
        files.update(script)
        argv, secret = secret_files(ins, mounts, opts.secrets, argv)
        files.update(secret)
        lower = self._lower_dirs(st)
        stubs = stub_paths(lower, [m.target for m in mounts if m.type != "secret"]
                           + sorted(files))

        def layers(m: RunMount) -> list[Path]:  # (a from='s image: its layers)
            image = froms.get(stage.mount_from.get(ins, {}).get(m.from_, ""), "")
            return self.store.layer_dirs(self.store.inspect(image)) if image else []

        async with run_mounts(ins, mounts, ctx, self.dir, self.tmp, layers) as specs:
            in_mounts = await asyncio.to_thread(stubs_in_mounts, specs, sorted(files))
            _ACTIVE.add(task_id)
            cfg = TaskConfig(task_id=task_id, hostname="build", command=tuple(argv),
                             env={**st.args, **st.config.env}, workdir=st.config.workdir,
                             image=st.image, user=st.config.user, files=files,
                             host_network=network == "host", mounts=tuple(specs))
            try:
                try:
                    await self.runtime.start(cfg, before_start=functools.partial(
                        net.attach, task_id) if net is not None else None)
                except Exception as exc:  # a start failure (bad user, image gone...)
                    raise BuildError(f"RUN: cannot start: {exc}", ins.line) from None
                seen = 0
                deadline = time.monotonic() + self.run_timeout
                while True:
                    status = self.runtime.status(task_id)
                    lines = self.runtime.read_logs(task_id)
                    for log_line in lines[seen:]:
                        emit(log_line.line)
                    seen = max(seen, len(lines))
                    if status is None or status.state is RunState.EXITED:
                        break
                    if time.monotonic() > deadline:
                        raise BuildError(f"RUN did not finish in {self.run_timeout:g}s",
                                         ins.line)
                    await asyncio.sleep(0.05)
                code = status.exit_code if status is not None else None
                if code != 0:
                    raise BuildError(f"RUN {ins.args} returned a non-zero code: {code} "
                                     f"({status.message if status else 'unknown'})", ins.line)
                upper = self.runtime.logs_path(task_id)[0].parent / "upper"
                await asyncio.to_thread(remove_stubs, upper, stubs)
                return await asyncio.to_thread(self._diff_layer, upper)
            finally:  # (a failed or cancelled build too: the task, then its address, go)
                _ACTIVE.discard(task_id)
                with contextlib.suppress(Exception):
                    await self.runtime.remove(task_id)
                for where, made in in_mounts:  # (a cache keeps no mount point of a file)
                    await asyncio.to_thread(remove_stubs, where, made)
                if net is not None:
                    with contextlib.suppress(Exception):
                        await net.detach(task_id)

    def _diff_layer(self, upper: Path) -> tuple[str, int] | None:
        """The RUN's upper dir as a layer tarball (None if it changed nothing)."""
        if not any(upper.iterdir()):
            return None
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="layer-", suffix=".tar")
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for root, dirs, names in os.walk(upper):
                    dirs.sort()
                    rel_root = os.path.relpath(root, upper)
                    if rel_root != "." and is_opaque(Path(root)):
                        info = tarfile.TarInfo(posixpath.join(rel_root, ".wh..wh..opq"))
                        tar.addfile(info)
                    for name in sorted(dirs) + sorted(names):
                        full = os.path.join(root, name)
                        rel = os.path.normpath(os.path.join(rel_root, name))
                        s = os.lstat(full)
                        if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:  # a whiteout
                            info = tarfile.TarInfo(posixpath.join(posixpath.dirname(rel),
                                                                  ".wh." + name))
                            tar.addfile(info)
                            continue
                        info = tar.gettarinfo(full, arcname=rel)
                        if info.isreg():
                            with open(full, "rb") as fh:
                                tar.addfile(info, fh)
                        elif info.isdir() or info.issym() or info.islnk():
                            tar.addfile(info)
                        # (other device nodes, fifos, sockets: not layered)
            return self._store_layer(Path(tmp))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _image_dir(lower: Sequence[Path], path: str, follow: bool = True) -> bool:
    """Whether ``path`` is a directory of the image whose layers are ``lower``, its symlinks
    followed inside the image (a layer's ``/app -> /root`` is the image's /root, never the
    host's)."""
    found = LayeredFS(lower).lookup("/" + path, follow=follow)
    return found is not None and bool(found[1]) and stat.S_ISDIR(os.lstat(found[1][0]).st_mode)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
