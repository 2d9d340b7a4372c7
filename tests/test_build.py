"""shoal.runtime.build for real: a 5-instruction Dockerfile (FROM the busybox-static test image,
RUN, COPY, ENV, CMD) built with the real runtime into a real image store, run as a task; an
unchanged rebuild is all cache hits and creates nothing; a changed COPY source rebuilds from
that step on; a failing RUN names its line; a deletion in a RUN is a whiteout in the image.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import needs_root, run_to_end, task

from shoal.runtime.build import Builder, BuildError, BuildOptions
from shoal.runtime.process import ProcessController
from shoal.runtime.registry import host_platform

pytest_plugins = ("test_runtime_support",)  # its fixtures
pytestmark = [
    needs_root,
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]

DOCKERFILE = """\
FROM base:1
RUN echo built > /built.txt && rm /bin/hostname
COPY hello.txt /app/
ENV GREETING=hi \\
    OTHER=x
CMD ["/bin/sh", "-c", "cat /built.txt /app/hello.txt; echo $GREETING; ls /bin/hostname"]
"""


def _layers(ctl: ProcessController) -> set[str]:
    return {p.name for p in (ctl.images.root / "layers").iterdir()}


async def test_build_run_rebuild_from_cache_and_change(ctl: ProcessController,
                                                       tmp_path: Path) -> None:
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "hello.txt").write_text("hello from the context\n")
    (ctx / "junk.log").write_text("ignored")
    (ctx / ".dockerignore").write_text("*.log\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    lines: list[str] = []
    first = await builder.build(ctx, BuildOptions(tags=("app:1",)), lines.append)
    assert (first.steps, first.cached, first.layers_created) == (5, 0, 2)
    assert "Successfully tagged app:1" in lines
    info = ctl.images.inspect("app:1")
    assert info.id == first.image.id and len(info.layers) == 3
    assert info.config.env == {"GREETING": "hi", "OTHER": "x"}

    cmd, env, _workdir, _user = info.config.apply()
    st, out, err = await run_to_end(ctl, task("run1", *cmd, env=env, image="app:1"))
    assert out == "built\nhello from the context\nhi\n"
    assert "hostname" in err and st.exit_code != 0  # the RUN's rm is a whiteout
    await ctl.remove("run1")

    # unchanged: every step but FROM from the cache, nothing created
    layers = _layers(ctl)
    lines.clear()
    again = await builder.build(ctx, BuildOptions(tags=("app:1",)), lines.append)
    assert (again.cached, again.layers_created, again.images_created) == (4, 0, 0)
    assert again.image.id == first.image.id and _layers(ctl) == layers
    assert sum("Using cache" in line for line in lines) == 4
    (ctx / "junk.log").write_text("changed, but ignored")
    assert (await builder.build(ctx, BuildOptions(), lines.append)).cached == 4

    # a changed COPY source: RUN still cached, COPY and what follows rebuilt
    (ctx / "hello.txt").write_text("changed\n")
    third = await builder.build(ctx, BuildOptions(tags=("app:2",)), lines.append)
    assert (third.cached, third.layers_created) == (1, 1)
    assert third.image.layers[:2] == first.image.layers[:2]
    # --no-cache runs every step again
    fourth = await builder.build(ctx, BuildOptions(no_cache=True), lines.append)
    assert (fourth.cached, fourth.layers_created) == (0, 2)


async def test_a_failing_run_names_its_line_and_leaves_no_task(ctl: ProcessController,
                                                               tmp_path: Path) -> None:
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nARG CODE=3\nRUN echo out; exit $CODE\n")
    lines: list[str] = []
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    with pytest.raises(BuildError, match=r"line 3: RUN .* non-zero code: 4") as exc:
        await builder.build(ctx, BuildOptions(build_args={"CODE": "4"}), lines.append)
    assert exc.value.line == 3 and "out" in lines
    assert ctl.tasks() == {}
    # a RUN task left behind (a build an agent restart cut short) is removed by the next build
    await ctl.start(task("buildleftover", "sleep", "1000", image="base:1"))
    with pytest.raises(BuildError, match="line 2: COPY: nope not found"):
        (ctx / "Dockerfile").write_text("FROM base:1\nCOPY nope /x\n")
        await builder.build(ctx, BuildOptions(), lines.append)
    assert ctl.tasks() == {}
    # ... and as the agent starts, with what such a build left in build/tmp (review: a restart
    # mid-build left its context, bind copies and layer tarballs there for good)
    from shoal.node.buildnet import remove_cut_short

    await ctl.start(task("buildleftover2", "sleep", "1000", image="base:1"))
    (builder.tmp / "ctx-1" / "sub").mkdir(parents=True)
    (builder.tmp / "layer-1.tar").write_bytes(b"partial")
    assert await remove_cut_short(ctl, builder.tmp) == ["buildleftover2"]
    assert ctl.tasks() == {} and list(builder.tmp.iterdir()) == []


async def test_config_instructions_and_workdir(ctl: ProcessController, tmp_path: Path) -> None:
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    (ctx / "conf").mkdir(parents=True)
    (ctx / "conf" / "a.conf").write_text("a")
    with tarfile.open(ctx / "bundle.tgz", "w:gz") as tf:
        tf.add(ctx / "conf", arcname="./inner")
    (ctx / "Dockerfile").write_text("""\
ARG TAG=1
FROM base:$TAG
ARG PORT=8080
ARG TAG
LABEL base-tag=$TAG
WORKDIR /srv/app
RUN pwd > here && id -u >> here
COPY --chown=app:app conf/ etc/
USER app
EXPOSE $PORT 53/udp
LABEL org.example.team="core team" version=2
HEALTHCHECK --interval=5s --retries=2 CMD wget -q localhost:$PORT
STOPSIGNAL SIGQUIT
VOLUME /srv/data/ /var/log
VOLUME ["/srv/$TAG"]
ENTRYPOINT ["/bin/sh", "-c"]
ADD bundle.tgz /opt/
COPY conf/a.conf /tmp
""")
    res = await Builder(ctl, ctl.images, tmp_path / "build").build(
        ctx, BuildOptions(tags=("cfg:1",), build_args={"PORT": "9000"}), lambda _: None)
    cfg = ctl.images.inspect("cfg:1").config
    assert (cfg.workdir, cfg.user, cfg.stop_signal) == ("/srv/app", "app", "SIGQUIT")
    assert cfg.exposed_ports == ((53, "udp"), (9000, "tcp"))
    assert cfg.volumes == ("/srv/1", "/srv/data", "/var/log")  # (Docker's Volumes)
    assert cfg.to_json()["Volumes"] == {"/srv/1": {}, "/srv/data": {}, "/var/log": {}}
    assert cfg.labels == {"org.example.team": "core team", "version": "2", "base-tag": "1"}
    assert cfg.entrypoint == ("/bin/sh", "-c") and cfg.cmd == ()
    assert cfg.healthcheck is not None and cfg.healthcheck.retries == 2
    assert cfg.healthcheck.test == ("CMD-SHELL", "wget -q localhost:$PORT")
    top = ctl.images.layer_dirs(res.image)  # (top first: COPY, ADD, COPY, RUN, WORKDIR, base)
    assert (top[3] / "srv" / "app" / "here").read_text() == "/srv/app\n0\n"
    conf = top[2] / "srv" / "app" / "etc" / "a.conf"
    assert conf.read_text() == "a" and (conf.stat().st_uid, conf.stat().st_gid) == (1000, 1000)
    assert (top[1] / "opt" / "inner" / "a.conf").read_text() == "a"  # ADD extracts a tar
    assert (top[0] / "tmp" / "a.conf").read_text() == "a"  # into the existing /tmp
    assert (top[0] / "tmp").stat().st_mode & 0o7777 == 0o1777  # its mode kept
    assert len(res.image.layers) == 6


async def test_labels_of_the_build_are_the_results_last_step(ctl: ProcessController,
                                                             tmp_path: Path) -> None:
    """``--label``/Compose's ``build.labels``: set on the result as given (a ``$`` is not
    expanded), over the Dockerfile's own; the same labels again are a cache hit, other ones
    a new image on the same layers."""
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nLABEL team=a keep=1\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    labels = {"team": "core team", "price": "$5 'or' \\x"}
    first = await builder.build(ctx, BuildOptions(tags=("l:1",), labels=labels), print)
    assert first.image.config.labels == {"team": "core team", "keep": "1",
                                         "price": "$5 'or' \\x"}
    again = await builder.build(ctx, BuildOptions(labels=labels), print)
    assert (again.image.id, again.cached) == (first.image.id, again.steps - 1)
    other = await builder.build(ctx, BuildOptions(labels={"team": "b"}), print)
    assert other.image.id != first.image.id and other.image.config.labels["team"] == "b"
    assert other.layers_created == 0


async def test_a_node_without_a_task_network_says_so_and_builds_with_none_or_host(
        ctl: ProcessController, tmp_path: Path) -> None:
    """The agent's RunNetwork (node/buildnet.py) on a node in no swarm (no Mesh): a RUN of
    the default network fails naming the way out and leaves no task; ``none`` builds (only
    lo: `ip -o link` lists lo alone), ``host`` as well (the node's links)."""
    from shoal.node.buildnet import MeshRunNetwork

    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN /bin/busybox ip -o link > /links\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build", network=MeshRunNetwork(lambda: None))
    with pytest.raises(BuildError, match=r"line 2: RUN: this node has no task network \(it "
                                         r"is in no swarm.*\): build with --network none or "
                                         r"host$"):
        await builder.build(ctx, BuildOptions(), print)
    assert ctl.tasks() == {}
    res = await builder.build(ctx, BuildOptions(network="none"), print)
    links = (ctl.images.layer_dirs(res.image)[0] / "links").read_text()
    assert links.count("\n") == 1 and ": lo:" in links, links
    res = await builder.build(ctx, BuildOptions(network="host", no_cache=True), print)
    links = (ctl.images.layer_dirs(res.image)[0] / "links").read_text()
    assert links.count("\n") == len(os.listdir("/sys/class/net")), links


MULTISTAGE = """\
ARG BASE=base:1
ARG GREETING=hello
FROM --platform=$BUILDPLATFORM $BASE AS Builder
ARG GREETING
ARG TARGETARCH
RUN mkdir -p /out/dir && echo "$GREETING built, base=$BASE $TARGETARCH" > /out/app.txt && \\
    echo a > /out/dir/a && echo b > /out/dir/b && ln -s app.txt /out/link && \\
    chown 1000:1000 /out/app.txt
RUN rm /out/dir/a
COPY --link src.txt /out/
FROM builder AS test
RUN exit 7
FROM slim:1
COPY --from=base:1 /bin/busybox /bin/
COPY --from=0 /out/dir /dir
COPY --link --from=BUILDER /out/link /out/app.txt /app/
COPY --chown=web --from=builder /out/src.txt /app/
CMD ["/bin/busybox", "sh", "-c", "cat /app/link /app/src.txt; ls /dir"]
"""


async def test_a_multi_stage_build_copies_a_stages_files_into_another_base(
        ctl: ProcessController, tmp_path: Path) -> None:
    """Stage 1 (busybox) RUNs and COPYs; the last stage, from an image with no shell, takes
    files from it by name (any case) and index, and busybox from an image by reference; the
    result runs. The stage the target does not use is not built (its RUN would fail); a
    global ARG is seen in FROM and where re-declared only. The cache holds across stages: an
    unchanged rebuild makes nothing; a change in stage 1 is a miss at the COPY --from that
    reads it; ``--target`` builds up to that stage."""
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    slim = tmp_path / "slim"
    (slim / "etc").mkdir(parents=True)
    (slim / "etc" / "passwd").write_text("root:x:0:0::/:/x\nweb:x:1001:1001::/:/x\n")
    (slim / "etc" / "group").write_text("root:x:0:\nweb:x:1001:\n")
    ctl.images.import_rootfs("slim:1", slim)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MULTISTAGE)
    (ctx / "src.txt").write_text("source v1\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    lines: list[str] = []
    first = await builder.build(ctx, BuildOptions(tags=("ms:1",)), lines.append)
    assert "Skipping stage test (line 11): stage 2 does not use it" in lines, lines
    assert not any("exit 7" in line for line in lines)
    assert (first.steps, first.cached, first.layers_created) == (12, 0, 7)
    assert "Step 12/14 : COPY --link --from=BUILDER /out/link /out/app.txt /app/" in lines
    base = ctl.images.inspect("slim:1")
    assert first.image.layers[:1] == base.layers and len(first.image.layers) == 5

    cmd, env, _workdir, _user = first.image.config.apply()
    st, out, err = await run_to_end(ctl, task("ms1", *cmd, env=env, image="ms:1"))
    arch = host_platform()[1]  # (BuildKit's TARGETARCH: seen where declared)
    assert (st.exit_code, out) == (0, f"hello built, base= {arch}\nsource v1\nb\n"), err
    await ctl.remove("ms1")
    top = ctl.images.layer_dirs(first.image)  # (top first: src.txt, app/, dir, busybox)
    owners = {p: ((top[i] / p).stat().st_uid, (top[i] / p).stat().st_gid) for i, p in (
        (0, "app/src.txt"), (1, "app/app.txt"), (1, "app/link"), (2, "dir/b"))}
    assert owners == {"app/src.txt": (1001, 1001), "app/app.txt": (1000, 1000),
                      "app/link": (1000, 1000), "dir/b": (0, 0)}  # (kept; --chown)
    assert not (top[2] / "dir" / "a").exists()  # (a RUN removed it in stage 1)
    assert (top[1] / "app" / "link").read_text() == f"hello built, base= {arch}\n"

    # unchanged: from the cache, nothing made, the same image
    again = await builder.build(ctx, BuildOptions(), lines.append)
    assert (again.image.id, again.cached, again.images_created, again.layers_created) == (
        first.image.id, 8, 0, 0)
    # stage 1 changed: its COPY and the COPY --from's reading it miss, busybox's hits
    (ctx / "src.txt").write_text("source v2\n")
    lines.clear()
    changed = await builder.build(ctx, BuildOptions(), lines.append)
    assert (changed.cached, changed.layers_created) == (3, 4), lines
    assert changed.image.layers[:2] == first.image.layers[:2]

    # --target: up to that stage (any case), the stages after it not built
    lines.clear()
    built = await builder.build(ctx, BuildOptions(target="BUILDER", tags=("ms:builder",)),
                                lines.append)
    assert built.steps == 6 and built.cached == 3 and built.layers_created == 0
    assert ctl.images.inspect("ms:builder").layers[:1] == ctl.images.inspect("base:1").layers
    assert not any("slim" in line or "test" in line for line in lines), lines
    with pytest.raises(BuildError, match=r"^line 12: RUN exit 7 returned a non-zero code: 7"):
        await builder.build(ctx, BuildOptions(target="test"), lines.append)
    with pytest.raises(BuildError, match=r"^target stage 'prod' is not in the Dockerfile "
                       r"\(its stages: builder, test\)"):
        await builder.build(ctx, BuildOptions(target="prod"), lines.append)
    # COPY --from an image the node lacks (no stage has that name): its line, before any step
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN echo ran\nCOPY --from=gone:1 /x /x\n")
    lines.clear()
    with pytest.raises(BuildError, match=r"^line 3: COPY --from=gone:1 \(no stage has that "
                       r"name\): no such image on this node"):
        await builder.build(ctx, BuildOptions(), lines.append)
    assert "ran" not in lines and ctl.tasks() == {}


BUILDKIT = """\
FROM base:1 AS tools
RUN mkdir -p /opt/tool && echo tool-from-stage > /opt/tool/v.txt
FROM base:1
ARG N
WORKDIR /app
RUN --mount=type=cache,target=/var/cache/thing,id=things \\
    --mount=type=bind,source=conf.txt,target=/etc/conf.txt \\
    --mount=type=bind,from=tools,source=/opt/tool,target=/mnt/tool \\
    --mount=type=bind,target=ctx,rw \\
    --mount=type=tmpfs,target=/scratch,size=1m \\
    cat /etc/conf.txt /mnt/tool/v.txt > seen.txt && touch ctx/written && \\
    echo run-$N >> /var/cache/thing/runs && cat /var/cache/thing/runs >> seen.txt && \\
    touch /scratch/x && grep -q " /scratch tmpfs" /proc/mounts && echo tmpfs >> seen.txt
RUN <<EOF
echo heredoc-run > /app/h.txt
echo "home is $HOME" >> /app/h.txt
EOF
RUN <<S
#!/bin/sh
echo "script at $0" > /app/script.txt
S
COPY <<notes.txt <<'raw.txt' /app/
arg is ${N}
notes.txt
not $N
raw.txt
SHELL ["/bin/echo", "via-shell:"]
RUN hello
CMD run me
"""


def _image_files(ctl: ProcessController, ref: str) -> dict[str, str]:
    """Every path of an image (its merged layers) -> its content ("" for a directory)."""
    from shoal.runtime.buildstages import LayeredFS

    fs = LayeredFS(ctl.images.layer_dirs(ctl.images.inspect(ref)))
    found = fs.lookup("/")
    assert found is not None
    return {rel: "" if p.is_dir() or p.is_symlink() else p.read_text(errors="replace")
            for rel, p in fs.walk(found[1])}


async def test_buildkit_mounts_heredocs_and_shell(ctl: ProcessController,
                                                  tmp_path: Path) -> None:
    """RUN --mount: a cache kept across builds (build 2's RUN sees what build 1's wrote) and in
    neither image; a bind of a context file, of a stage's directory, of the context read-write
    (writes discarded), a tmpfs — none of them, nor the directories made to mount them on, in
    the layer. Heredoc RUNs (by the shell; a #! script) and COPY (expanded unless quoted);
    SHELL runs the shell form of what follows and is the config's; a failing first command
    under SHELL ["/bin/sh", "-ec"] fails the RUN."""
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(BUILDKIT)
    (ctx / "conf.txt").write_text("conf-from-context\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    lines: list[str] = []
    await builder.build(ctx, BuildOptions(tags=("bk:1",), build_args={"N": "1"}), lines.append)
    assert "via-shell: hello" in lines, lines
    files = _image_files(ctl, "bk:1")
    assert files["app/seen.txt"] == "conf-from-context\ntool-from-stage\nrun-1\ntmpfs\n"
    assert files["app/h.txt"] == "heredoc-run\nhome is /root\n"
    assert files["app/script.txt"] == "script at /.shoal-heredoc/S\n"
    assert (files["app/notes.txt"], files["app/raw.txt"]) == ("arg is 1\n", "not $N\n")
    for gone in ("var", "var/cache", "etc/conf.txt", "mnt", "scratch", "app/ctx",
                 ".shoal-heredoc"):
        assert gone not in files, gone
    assert not (ctx / "written").exists()
    assert [p.name for p in (tmp_path / "build" / "tmp").iterdir()] == []  # (copies gone)
    assert len(list((tmp_path / "build" / "cache").iterdir())) == 1
    cfg = ctl.images.inspect("bk:1").config
    assert cfg.shell == ("/bin/echo", "via-shell:")
    assert cfg.cmd == ("/bin/echo", "via-shell:", "run me")

    # build 2 (N changed: the RUN runs again) sees the cache build 1 filled
    (ctx / "conf.txt").write_text("conf v2\n")
    second = await builder.build(ctx, BuildOptions(tags=("bk:2",), build_args={"N": "2"}),
                                 lines.append)
    assert second.cached == 1  # (the tools stage's RUN; N is in the keys from its ARG on)
    files = _image_files(ctl, "bk:2")
    assert files["app/seen.txt"] == "conf v2\ntool-from-stage\nrun-1\nrun-2\ntmpfs\n"
    assert "var" not in files and files["app/notes.txt"] == "arg is 2\n"
    # an unchanged rebuild: all from the cache, though the cache mount's content changed
    again = await builder.build(ctx, BuildOptions(build_args={"N": "2"}), lines.append)
    assert (again.image.id, again.layers_created) == (second.image.id, 0)
    # the bound context file changed: the RUN that binds it misses
    (ctx / "conf.txt").write_text("conf v3\n")
    third = await builder.build(ctx, BuildOptions(build_args={"N": "2"}), lines.append)
    assert _image_files(ctl, third.image.id)["app/seen.txt"].startswith("conf v3\n")

    (ctx / "Dockerfile").write_text('FROM base:1\nSHELL ["/bin/sh", "-ec"]\n'
                                    "RUN false; echo not reached\n")
    with pytest.raises(BuildError, match="line 3: RUN false; echo not reached returned"):
        await builder.build(ctx, BuildOptions(), lines.append)
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN --network=host true\n")
    with pytest.raises(BuildError, match="line 2: RUN --network=host needs the build's"):
        await builder.build(ctx, BuildOptions(network="none"), lines.append)
    assert ctl.tasks() == {}
