"""shoal.runtime.build without a runtime: the Dockerfile parser (continuations, comments,
errors with line numbers), variable expansion, ENV/LABEL pairs, HEALTHCHECK, .dockerignore,
the layer-cache keys, and multi-stage builds' stages (names, references, targets, the errors
naming their line) and the merged view of an image's layers that COPY --from reads."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from shoal.runtime.build import (
    BuildError,
    Instruction,
    cache_key,
    context_files,
    expand,
    ignored,
    parse_dockerfile,
    parse_healthcheck,
    parse_pairs,
    read_dockerignore,
)

DOCKERFILE = """\
# syntax comment
ARG BASE=app:1
FROM $BASE

RUN echo one \\
    # a comment inside a continuation is dropped
    && echo two
COPY ["a.txt", "/srv/"]
env GREETING=hi
CMD ["sh", "-c", "echo $GREETING"]
"""


def test_parser_joins_continuations_skips_comments_and_keeps_line_numbers() -> None:
    got = parse_dockerfile(DOCKERFILE)
    assert [(i.line, i.cmd) for i in got] == [
        (2, "ARG"), (3, "FROM"), (5, "RUN"), (8, "COPY"), (9, "ENV"), (10, "CMD")]
    assert got[2].args == "echo one && echo two"
    assert got[2].exec_form() is None
    assert got[3].exec_form() == ["a.txt", "/srv/"]
    assert got[5].exec_form() == ["sh", "-c", "echo $GREETING"]


@pytest.mark.parametrize(("text", "line", "words"), [
    ("FROM a\nRUN x\nSHELL [\"sh\"]\n", 3, "unsupported instruction 'SHELL'"),
    ("FROM a\n\nFROBNICATE x\n", 3, "unknown instruction 'FROBNICATE'"),
    ("RUN x\n", 1, "must start with FROM"),
])
def test_parser_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(BuildError) as err:
        parse_dockerfile(text)
    assert err.value.line == line
    assert words in str(err.value) and str(err.value).startswith(f"line {line}:")


def test_volume_paths_as_docker_reads_them() -> None:
    from shoal.runtime.dockerfile import Instruction, parse_volumes

    def paths(args: str) -> list[str]:
        return parse_volumes(Instruction(4, "VOLUME", args), args)

    assert paths('["/data", "/var/log/"]') == ["/data", "/var/log"]
    assert paths("/a /b//c") == ["/a", "/b/c"]
    for bad, words in (("data", "'data' is not an absolute path"), ("/", "'/' is not"),
                       ("", "at least one path")):
        with pytest.raises(BuildError, match=words) as err:
            paths(bad)
        assert err.value.line == 4


def test_variable_expansion() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert expand("$A/${A}/${B:-dflt}/${A:+alt}/${EMPTY:+x}/\\$A", env) == "1/1/dflt/alt//$A"


def test_env_and_label_pairs() -> None:
    assert parse_pairs('A=1 B="two words" C=', 1, "ENV") == [("A", "1"), ("B", "two words"),
                                                             ("C", "")]
    assert parse_pairs("LEGACY value with spaces", 1, "ENV") == [("LEGACY", "value with spaces")]
    with pytest.raises(BuildError, match="line 4: ENV: expected KEY=VALUE"):
        parse_pairs("A=1 junk", 4, "ENV")


def test_healthcheck() -> None:
    hc = parse_healthcheck("--interval=5s --retries=2 CMD wget -q localhost", 1)
    assert hc.test == ("CMD-SHELL", "wget -q localhost")
    assert (hc.interval, hc.retries, hc.timeout) == (5.0, 2, 0.0)
    assert parse_healthcheck('CMD ["true"]', 1).test == ("CMD", "true")
    assert parse_healthcheck("NONE", 1).test == ("NONE",)
    assert parse_healthcheck("--timeout=1m30s CMD x", 1).timeout == 90.0
    with pytest.raises(BuildError, match="line 7"):
        parse_healthcheck("--bogus=1 CMD x", 7)


def test_dockerignore(tmp_path: Path) -> None:
    pats = read_dockerignore("# c\n*.log\nbuild/\n!keep.log\n**/secret\n")
    assert ignored("a.log", pats) and not ignored("keep.log", pats)
    assert ignored("build/out/x", pats) and ignored("deep/er/secret", pats)
    assert not ignored("src/main.c", pats)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.c").write_text("x")
    (tmp_path / "debug.log").write_text("x")
    (tmp_path / ".dockerignore").write_text("*.log\n")
    assert context_files(tmp_path) == [".dockerignore", "src", "src/x.c"]


def test_cache_keys_change_with_every_input() -> None:
    run = Instruction(3, "RUN", "make")
    base = cache_key("sha256:p", run, "make", {})
    assert base == cache_key("sha256:p", Instruction(9, "RUN", "make"), "make", {})  # line: no
    others = {
        cache_key("sha256:q", run, "make", {}),  # another parent
        cache_key("sha256:p", Instruction(3, "RUN", "make all"), "make all", {}),
        cache_key("sha256:p", run, "make", {"V": "1"}),  # a build arg in scope
        cache_key("sha256:p", Instruction(3, "CMD", "make"), "make", {}),
        cache_key("sha256:p", run, "make", {}, files="abc"),  # COPY's files
    }
    assert base not in others and len(others) == 5


def test_api_options_name_the_bad_field() -> None:
    from multidict import MultiDict

    from shoal.runtime.build import options_from_query

    opts = options_from_query(MultiDict([("t", "web:1"), ("t", "web:latest"),
                                         ("buildarg", "A=1"), ("buildarg", "B="),
                                         ("dockerfile", "sub/Dockerfile"), ("nocache", "1"),
                                         ("label", "team=core team"), ("label", "x="),
                                         ("network", "host")]))
    assert opts.tags == ("web:1", "web:latest") and opts.build_args == {"A": "1", "B": ""}
    assert opts.network == "host" and options_from_query(MultiDict()).network == "default"
    assert opts.labels == {"team": "core team", "x": ""}
    assert opts.dockerfile == "sub/Dockerfile" and opts.no_cache and opts.target == ""
    assert options_from_query(MultiDict([("target", "Build-2")])).target == "Build-2"
    for query, fld in (([("t", "Bad Tag")], "t"), ([("buildarg", "novalue")], "buildarg"),
                       ([("dockerfile", "../x")], "dockerfile"), ([("label", "a")], "label"),
                       ([("network", "bridge")], "network"),
                       ([("target", "2nd stage")], "target")):
        with pytest.raises(BuildError) as err:
            options_from_query(MultiDict(query))
        assert err.value.field == fld


def test_a_context_that_cannot_be_packed_leaves_no_tar_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Review: a file gone or unreadable while the context was packed left the partial tar
    — the context's files so far — in the temporary directory; `stack deploy` packs one
    per built service.)"""
    import os
    import tarfile
    import tempfile

    from shoal.cli import build

    ctx, tmp = tmp_path / "ctx", tmp_path / "tmp"
    ctx.mkdir()
    tmp.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")
    (ctx / "a").write_text("a")
    (ctx / "secret").write_text("s3cret")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # the tar has no name while it is sent: a CLI killed mid-build (SIGKILL: no cleanup
    # runs) leaves nothing in /tmp (it left shoal-build-*.tar there)
    body, _ = build.pack_context(str(ctx), "")
    with body, tarfile.open(fileobj=body) as tar:
        assert sorted(tar.getnames()) == ["Dockerfile", "a", "secret"] and os.listdir(tmp) == []
    real = tarfile.TarFile.add

    def add(self: tarfile.TarFile, name: str, *args: object, **kwargs: object) -> None:
        if name.endswith("secret"):
            raise PermissionError(13, "Permission denied", name)
        real(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "add", add)
    with pytest.raises(PermissionError):
        build.pack_context(str(ctx), "")
    assert os.listdir(tmp) == []


# ------------------------------------------------------------------------------ multi-stage

STAGES = """\
ARG BASE=base:1
ARG TOOLS
FROM $BASE AS Build
RUN make
FROM build AS test
RUN check
FROM nginx AS nginx
FROM busybox:1
COPY --from=BUILD /out /app
COPY --from=0 /x /y
COPY --chown=1:1 --from=busybox:1.36 /bin/busybox /bin/
COPY --from=$TOOLS /t /t
"""


def test_stages_are_split_named_and_their_references_resolved() -> None:
    from shoal.runtime.buildstages import needed, plan_stages, target_stage

    stages = plan_stages(parse_dockerfile(STAGES), {"BASE": "base:1", "TOOLS": "reg/tools:2"})
    assert [(s.index, s.name, s.base, s.base_stage) for s in stages] == [
        (0, "build", "base:1", None), (1, "test", "build", 0), (2, "nginx", "nginx", None),
        (3, "", "busybox:1", None)]  # (FROM nginx AS nginx: the image, as Docker's)
    assert [[i.cmd for i in s.instructions] for s in stages] == [["RUN"], ["RUN"], [],
                                                                  ["COPY"] * 4]
    assert list(stages[3].copy_from.values()) == [0, 0, "busybox:1.36", "reg/tools:2"]
    assert (stages[3].label, stages[1].label) == ("3", "test")
    assert target_stage(stages, "") == 3 and target_stage(stages, "TEST") == 1
    assert needed(stages, 1) == {0, 1} and needed(stages, 3) == {0, 3}
    assert needed(stages, 2) == {2}
    with pytest.raises(BuildError, match=r"target stage 'prod' is not in the Dockerfile "
                       r"\(its stages: build, test, nginx\)") as err:
        target_stage(stages, "prod")
    assert err.value.field == "target"


@pytest.mark.parametrize(("text", "line", "words"), [
    ("FROM a AS x\nFROM b AS X\n", 2, "FROM: duplicate stage name 'x' (first at line 1)"),
    ("FROM a AS x\nCOPY --from=x /a /b\n", 2, "COPY --from=x: that is this stage itself"),
    ("FROM a\nFROM b\nCOPY --from=1 /a /b\n", 3, "COPY --from=1: that is this stage itself"),
    ("FROM a\nCOPY --from=later /a /b\nFROM b AS later\n", 2,
     "COPY --from=later: stage 'later' is defined later (line 3)"),
    ("FROM a\nCOPY --from=1 /a /b\nFROM b\n", 2, "COPY --from=1: stage '1' is defined later"),
    ("FROM a\nCOPY --from=5 /a /b\n", 2, "COPY --from=5: there is no stage 5"),
    ("FROM later\nFROM b AS later\n", 1, "FROM later: stage 'later' is defined later"),
    ("FROM a AS x\nFROM a\nADD --from=x /a /b\n", 3, "ADD --from is not supported"),
    ("FROM a AS 1st\n", 1, "FROM: '1st' is not a stage name"),
    ("FROM a AS\n", 1, "FROM a AS: expected FROM IMAGE [AS NAME]"),
    ("FROM a b\n", 1, "FROM a b: expected FROM IMAGE [AS NAME]"),
    ("FROM a\nCOPY --from /a /b\n", 2, "COPY: unsupported flag --from"),
    ("FROM a\nCOPY --from= /a /b\n", 2, "COPY: flag --from needs a value"),
])
def test_stage_errors_name_the_line(text: str, line: int, words: str) -> None:
    from shoal.runtime.buildstages import plan_stages

    with pytest.raises(BuildError) as err:
        plan_stages(parse_dockerfile(text), {})
    assert err.value.line == line
    assert str(err.value).startswith(f"line {line}: {words}"), str(err.value)


def test_from_platform_is_the_nodes_own_and_its_args_are_buildkits() -> None:
    from shoal.runtime.buildstages import parse_from, platform_args

    meta = platform_args("linux", "arm", "v7")
    assert (meta["TARGETPLATFORM"], meta["BUILDARCH"], meta["TARGETVARIANT"]) == (
        "linux/arm/v7", "arm", "v7")
    for flag in ("$BUILDPLATFORM", "${TARGETPLATFORM}", "linux/arm"):
        assert parse_from(Instruction(1, "FROM", f"--platform={flag} a:1 AS b"), meta,
                          "linux/arm/v7") == ("a:1", "b")
    for args, words in (("--platform=linux/amd64 a", "FROM --platform=linux/amd64: this "
                         "node builds linux/arm/v7 images only"),
                        ("--pull a", "FROM: unsupported flag --pull (only --platform=)"),
                        ("--platform=linux/arm", "FROM needs an image")):
        with pytest.raises(BuildError, match=f"^line 4: {re.escape(words)}"):
            parse_from(Instruction(4, "FROM", args), meta, "linux/arm/v7")


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are device nodes: needs root")
def test_copy_from_reads_an_images_layers_as_overlayfs_merges_them(tmp_path: Path) -> None:
    """(The overlay form the store unpacks layers into: a whiteout is a 0/0 character
    device, an opaque directory has trusted.overlay.opaque=y; top layer first.)"""
    from shoal.runtime.buildstages import LayeredFS, stage_sources

    top, mid, low = (tmp_path / n for n in ("top", "mid", "low"))
    for layer, files in ((low, {"app/a": "low a", "app/b": "low b", "opq/old": "x",
                                "gone/x": "x", "f": "file"}),
                         (mid, {"app/c": "mid c", "opq/new": "y", "bin/tool": "tool"}),
                         (top, {"app/b": "top b", "f/inside": "dir over a file"})):
        for rel, text in files.items():
            (layer / rel).parent.mkdir(parents=True, exist_ok=True)
            (layer / rel).write_text(text)
    os.setxattr(mid / "opq", "trusted.overlay.opaque", b"y")
    os.mknod(top / "app" / "a", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(top / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "lib").mkdir()
    os.symlink("../bin/tool", top / "lib" / "link")
    os.symlink("/app", top / "applink")
    fs = LayeredFS([top, mid, low])
    listed = {n: [str(p.relative_to(tmp_path)) for p in e]
              for n, e in fs.listdir([top, mid, low]).items()}
    assert listed["app"] == ["top/app", "mid/app", "low/app"] and "gone" not in listed
    assert listed["f"] == ["top/f"]  # (a directory above hides the file below)
    assert sorted(fs.listdir(fs.lookup("/app")[1])) == ["b", "c"]  # type: ignore[index]
    assert sorted(fs.listdir(fs.lookup("opq")[1])) == ["new"]  # type: ignore[index]
    assert fs.lookup("/gone/x") is None and fs.lookup("/app/a") is None
    assert fs.lookup("/lib/link")[0] == "/bin/tool"  # type: ignore[index]
    assert fs.lookup("/lib/link", follow=False)[0] == "/lib/link"  # type: ignore[index]
    assert fs.lookup("/applink/../lib/../app/c")[0] == "/app/c"  # type: ignore[index]
    assert [p for p, _ in fs.glob("/app/[bc]")] == ["/app/b", "/app/c"]

    def copy(args: str) -> dict[str, str]:
        ins = Instruction(7, "COPY", args)
        return {dest: str(Path(src).relative_to(tmp_path))
                for src, dest, _ in stage_sources([top, mid, low], ins, args, "build")}

    assert copy("--from=build /app /dst") == {"/dst": "top/app", "/dst/b": "top/app/b",
                                              "/dst/c": "mid/app/c"}
    assert copy("--from=build lib/link app/* /d/") == {
        "/d/link": "mid/bin/tool", "/d/b": "top/app/b", "/d/c": "mid/app/c"}
    assert copy("--from=build /lib/link /tool") == {"/tool": "mid/bin/tool"}
    assert copy('--from=build ["/app/b", "/j"]') == {"/j": "top/app/b"}
    assert stage_sources([], Instruction(7, "COPY", "--from=s / /d"), "--from=s / /d",
                         "s") == []  # (an empty stage: FROM scratch alone)
    assert LayeredFS([]).glob("/*") == [] and LayeredFS([]).lookup("/x") is None
    with pytest.raises(BuildError, match="line 7: COPY --from=build: /app/a not found there"):
        copy("--from=build /app/a /x")
