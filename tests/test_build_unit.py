"""shoal.runtime.build without a runtime: the Dockerfile parser (continuations, comments,
errors with line numbers), variable expansion, ENV/LABEL pairs, HEALTHCHECK, .dockerignore,
the layer-cache keys, and multi-stage builds' stages (names, references, targets, the errors
naming their line) and the merged view of an image's layers that COPY --from reads."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
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
    ("FROM a\nRUN x\nONBUILD RUN y\n", 3, "unsupported instruction 'ONBUILD'"),
    ("FROM a\nRUN x\nRUN cat <<EOF\nno end\n", 3, "unterminated heredoc <<EOF"),
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

    from shoal.runtime.buildrequest import options_from_query

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
                        ("--platform=linux/arm", "FROM needs an image"),
                        # (netbox's FROM ${FROM} without --build-arg: say which is empty)
                        ("--platform=linux/arm ${FROM} AS main", "FROM needs an image "
                         "(${FROM} is empty: give its ARG a default or --build-arg)"),
                        ("$BASE", "FROM needs an image ($BASE is empty")):
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


# ------------------------------------------------------------------ BuildKit's RUN and heredocs

HEREDOCS = """\
FROM a
RUN <<EOF
echo one
# not a comment: the script's
EOF
RUN <<-EOT
\techo "tabs $HOME"
\tEOT
RUN python3 <<'PY' && echo after
print("$HOME")
PY
COPY <<a.txt <<"b.txt" /dir/
A is $NAME
a.txt
B is $NAME
b.txt
RUN echo "<<NOT" && cat <<X
x
X
CMD echo done
"""


def test_heredocs_are_read_as_buildkit_reads_them() -> None:
    got = parse_dockerfile(HEREDOCS)
    assert [(i.line, i.cmd) for i in got] == [
        (1, "FROM"), (2, "RUN"), (6, "RUN"), (9, "RUN"), (12, "COPY"), (17, "RUN"), (20, "CMD")]
    one, chomped, py, copy, quoted = got[1:6]
    assert one.args == "<<EOF" and [(h.name, h.content, h.expand, h.chomp)
                                     for h in one.heredocs] == [
        ("EOF", "echo one\n# not a comment: the script's\n", True, False)]
    assert chomped.heredocs[0].chomp and chomped.heredocs[0].text() == 'echo "tabs $HOME"\n'
    assert py.args == "python3 <<'PY' && echo after" and not py.heredocs[0].expand
    assert [(h.name, h.expand) for h in copy.heredocs] == [("a.txt", True), ("b.txt", False)]
    assert [h.name for h in quoted.heredocs] == ["X"]  # ("<<NOT" is quoted: no heredoc)


def test_a_runs_argv_from_its_heredocs_and_shell() -> None:
    from shoal.runtime.buildmounts import run_argv

    ins = parse_dockerfile(HEREDOCS)
    bash = ("/bin/bash", "-ec")
    assert run_argv(ins[1], ins[1].args, ()) == (
        ["/bin/sh", "-c", "echo one\n# not a comment: the script's\n"], {})
    assert run_argv(ins[2], ins[2].args, bash)[0] == ["/bin/bash", "-ec", 'echo "tabs $HOME"\n']
    # a command with a heredoc: the shell reads it (and expands it, or not, itself)
    assert run_argv(ins[3], ins[3].args, ())[0] == [
        "/bin/sh", "-c", "python3 <<'PY' && echo after\nprint(\"$HOME\")\nPY"]
    script = parse_dockerfile("FROM a\nRUN <<S\n#!/usr/bin/env python3\nprint(1)\nS\n")[1]
    assert run_argv(script, script.args, ()) == (
        ["/.shoal-heredoc/S"], {"/.shoal-heredoc/S": (b"#!/usr/bin/env python3\nprint(1)\n",
                                                      0o755)})
    # a delimiter with `/` or `..` names a file in /.shoal-heredoc all the same (review: the
    # RUN could not start: "files: must be normalised ... /.shoal-heredoc/../x")
    for name, path in (("../../x", "/.shoal-heredoc/x"), ("..", "/.shoal-heredoc/script")):
        odd = parse_dockerfile(f"FROM a\nRUN <<{name}\n#!/bin/sh\n{name}\n")[1]
        assert run_argv(odd, odd.args, ())[0] == [path]
    plain = parse_dockerfile('FROM a\nRUN ["echo", "x"]\nRUN echo $A\n')
    assert run_argv(plain[1], plain[1].args, bash)[0] == ["echo", "x"]
    assert run_argv(plain[2], plain[2].args, bash)[0] == ["/bin/bash", "-ec", "echo $A"]


def test_copy_heredocs_are_files_expanded_unless_quoted(tmp_path: Path) -> None:
    from shoal.runtime.buildmounts import copy_heredocs

    copy = parse_dockerfile(HEREDOCS)[4]
    for sub in ("1", "2", "3"):
        (tmp_path / sub).mkdir()
    rest, files, digest = copy_heredocs(copy, copy.args, {"NAME": "x"}, tmp_path / "1")
    assert rest == "/dir/" and [t for _, t, _ in files] == ["/dir/a.txt", "/dir/b.txt"]
    assert [Path(f).read_text() for f, _, _ in files] == ["A is x\n", "B is $NAME\n"]
    assert oct(Path(files[0][0]).stat().st_mode & 0o777) == "0o644"
    other = copy_heredocs(copy, copy.args, {"NAME": "y"}, tmp_path / "2")[2]
    assert other != digest  # (the expanded content is the step's cache input)
    one = parse_dockerfile("FROM a\nCOPY --chown=1:1 <<EOF /etc/motd\nhi\nEOF\n")[1]
    assert copy_heredocs(one, one.args, {}, tmp_path / "3")[:2] == (
        "--chown=1:1 /etc/motd", [(str(tmp_path / "3/0/EOF"), "/etc/motd", False)])
    # a delimiter with a `$` is the name the parser read (review: a KeyError, no BuildError,
    # when the expanded arguments named another heredoc: the build's stream just ended)
    dollar = parse_dockerfile("FROM a\nCOPY <<$N $D\nhi\n$N\n")[1]
    (tmp_path / "5").mkdir()
    assert copy_heredocs(dollar, dollar.args, {"N": "x", "D": "/d"}, tmp_path / "5")[:2] == (
        "/d", [(str(tmp_path / "5/0/$N"), "/d", False)])
    # a name that is no file name: a BuildError naming the line, never an agent's OSError
    # (review: "Is a directory: DATA_DIR/build/tmp/heredoc-.../0/..", no line)
    for name in ("..", "."):
        bad = parse_dockerfile(f"FROM a\nCOPY <<{name} /x/\nhi\n{name}\n")[1]
        (tmp_path / "4").mkdir(exist_ok=True)
        with pytest.raises(BuildError, match=f"line 2: COPY <<{re.escape(name)}: "):
            copy_heredocs(bad, bad.args, {}, tmp_path / "4")


def test_run_mount_flags_as_buildkit_reads_them() -> None:
    from shoal.runtime.dockerfile import RunMount, run_flags

    ins = parse_dockerfile(
        "FROM a\nRUN --mount=type=cache,target=/root/.cache/,id=pip,sharing=locked,"
        "uid=${U},mode=0700 --mount=\"type=bind,src=conf,dst=conf,rw\" "
        "--mount=type=tmpfs,target=/var/lib/dnf/,size=64m --network=none "
        "pip install x\n")[1]
    mounts, network, command = run_flags(ins, {"U": "33"}, "/app")
    assert (network, command) == ("none", "pip install x")
    assert mounts == [
        RunMount("cache", "/root/.cache", id="pip", sharing="locked", uid=33, mode=0o700),
        RunMount("bind", "/app/conf", source="conf", readonly=False),
        RunMount("tmpfs", "/var/lib/dnf", size=64 << 20)]
    assert run_flags(parse_dockerfile("FROM a\nRUN --mount=target=/x true\n")[1])[0] == [
        RunMount("bind", "/x", readonly=True)]  # (a bind, read-only, by default)


@pytest.mark.parametrize(("flag", "words"), [
    ("--mount=type=secret", "needs id=NAME"),
    ("--mount=type=secret,id=a/b", "id 'a/b' is not a secret id"),
    ("--mount=type=secret,id=x,env=1X", "env=1X is not a variable name"),
    ("--mount=type=secret,id=x,sharing=locked", "option 'sharing' is not one of"),
    ("--mount=type=secret,id=x,mode=999", "bad value"),
    ("--mount=type=secret,id=x,required=maybe", "required=maybe is not true or false"),
    ("--mount=type=ssh", "type=ssh is not supported"),
    ("--mount=type=cache", "needs target=PATH"),
    ("--mount=type=cache,target=/c,sharing=sometimes", "sharing=sometimes"),
    ("--mount=type=tmpfs,target=/t,source=x", "option 'source' is not one of"),
    ("--mount=type=bind,target=/proc/x", "cannot be / or under /proc"),
    ("--mount=type=volume,target=/v", "unknown type 'volume'"),
    ("--mount=type=cache,target=/c,colour=red", "unknown option 'colour'"),
    ("--security=insecure", "unsupported flag --security=insecure"),
    # (os.chown's OverflowError at build time was no BuildError: the stream ended silently)
    ("--mount=type=cache,target=/c,uid=4294967296", "uid and gid must be"),
    ("--mount=type=cache,target=/c,gid=99999999999", "uid and gid must be"),
    ("--mount=type=cache,target=/c --mount=type=tmpfs,target=/c", "two --mount on one"),
])
def test_run_mount_errors_name_the_line(flag: str, words: str) -> None:
    from shoal.runtime.buildstages import plan_stages

    with pytest.raises(BuildError) as err:
        plan_stages(parse_dockerfile(f"FROM a\nWORKDIR /w\nRUN {flag} true\n"), {})
    assert err.value.line == 3 and words in str(err.value), str(err.value)


def test_run_mount_from_a_stage_makes_it_a_dependency() -> None:
    from shoal.runtime.buildstages import needed, plan_stages

    text = ("FROM a AS tools\nRUN true\nFROM a AS other\nFROM b\n"
            "RUN --mount=type=bind,from=tools,source=/bin,target=/t "
            "--mount=type=bind,from=img:1,target=/i true\n")
    stages = plan_stages(parse_dockerfile(text), {})
    assert stages[2].mount_from == {stages[2].instructions[0]: {"tools": 0, "img:1": "img:1"}}
    assert needed(stages, 2) == {0, 2}  # (not "other")
    with pytest.raises(BuildError, match="from=later: stage 'later' is defined later"):
        plan_stages(parse_dockerfile("FROM a\nRUN --mount=from=later,target=/x true\n"
                                     "FROM b AS later\n"), {})


def test_run_cache_keys_cover_mount_options_bound_files_and_heredocs(tmp_path: Path) -> None:
    from shoal.runtime.buildmounts import mount_digest
    from shoal.runtime.dockerfile import RunMount

    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.py").write_text("1")
    bind = [RunMount("bind", "/s", source="src", readonly=True)]
    first = mount_digest(tmp_path, bind, {})
    assert mount_digest(tmp_path, [], {}) == ""
    assert mount_digest(tmp_path, bind, {}) == first
    (tmp_path / "src/a.py").write_text("2")
    assert mount_digest(tmp_path, bind, {}) != first  # (what is bound changed)
    cache = [RunMount("cache", "/c")]
    assert mount_digest(tmp_path, cache, {}) != mount_digest(
        tmp_path, [RunMount("cache", "/c", sharing="locked")], {})
    staged = [RunMount("bind", "/s", from_="build")]
    assert mount_digest(tmp_path, staged, {"build": "sha256:1"}) != mount_digest(
        tmp_path, staged, {"build": "sha256:2"})
    with pytest.raises(BuildError, match="outside the build context"):
        mount_digest(tmp_path, [RunMount("bind", "/s", source="../x")], {}, 4)
    one, two = (parse_dockerfile(f"FROM a\nRUN <<EOF\necho {n}\nEOF\n")[1] for n in (1, 2))
    assert one.args == two.args and cache_key("p", one, one.args, {}) != cache_key(
        "p", two, two.args, {})


def test_mount_stubs_are_what_mounting_made_and_left_empty(tmp_path: Path) -> None:
    from shoal.runtime.buildmounts import remove_stubs, stub_paths

    layer = tmp_path / "layer"
    (layer / "usr/lib").mkdir(parents=True)
    (layer / "var").symlink_to("usr")
    (layer / "etc").mkdir()  # (a systemd image's: dangling, made at its end by the mount)
    (layer / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (layer / "opt").symlink_to("/../../../outside")  # (clamped to the root, as the launcher)
    stubs = stub_paths([layer], ["/root/.cache/pip", "/usr/lib", "/var/cache/apt",
                                 "/.shoal-heredoc/S", "/etc/resolv.conf", "/opt/x"])
    assert stubs == ["run/systemd/resolve/stub-resolv.conf", "root/.cache/pip",
                     "usr/cache/apt", "run/systemd/resolve", "root/.cache", "usr/cache",
                     ".shoal-heredoc/S", "run/systemd", "outside/x", "root",
                     ".shoal-heredoc", "run", "outside"]  # (each before its parent)
    upper = tmp_path / "upper"
    for rel in ("root/.cache/pip", "usr/cache/apt", ".shoal-heredoc"):
        (upper / rel).mkdir(parents=True)
    (upper / ".shoal-heredoc/S").write_text("")
    (upper / "usr/cache/kept.txt").write_text("the RUN wrote this")
    remove_stubs(upper, stubs)
    assert sorted(str(p.relative_to(upper)) for p in upper.rglob("*")) == [
        "usr", "usr/cache", "usr/cache/kept.txt"]


def test_mount_stubs_of_two_targets_in_one_new_directory_all_go(tmp_path: Path) -> None:
    """Two mounts (a secret's file and its variable's script) under one directory the image
    lacks: the directory goes too (review: it was listed before its second child, so
    removing it found it not empty and left it in the layer)."""
    from shoal.runtime.buildmounts import remove_stubs, stub_paths

    (tmp_path / "layer").mkdir()
    stubs = stub_paths([tmp_path / "layer"], ["/new/a", "/new/b"])
    upper = tmp_path / "upper"
    (upper / "new").mkdir(parents=True)
    (upper / "new/a").write_text("")
    (upper / "new/b").write_text("")
    remove_stubs(upper, stubs)
    assert list(upper.iterdir()) == []


async def test_context_symlinks_out_of_it_are_not_followed_on_the_agent(tmp_path: Path
                                                                        ) -> None:
    """The agent (root) unpacks the context with its symlinks as they are: a Dockerfile, or an
    ADD's tar, that is a symlink out of the context is not read from the agent's host (review:
    the first word of any host file came back in the build's error; a host tar was extracted
    into the image)."""
    import tarfile

    from shoal.runtime.build import Builder, BuildOptions, context_sources

    host, ctx = tmp_path / "host", tmp_path / "ctx"
    host.mkdir()
    ctx.mkdir()
    (host / "shadow").write_text("root:secret-hash:19000:0:99999:7:::\n")
    (ctx / "Dockerfile").symlink_to(host / "shadow")
    with pytest.raises(BuildError, match="not a file of the build context") as err:
        await Builder(None, None, tmp_path / "build").build(ctx, BuildOptions(), print)
    assert "secret-hash" not in str(err.value)
    # a FIFO (a context tar may hold one) is no Dockerfile: it was read in the agent's event
    # loop, which waited for a writer for good (here one comes after 1 s, to end the test)
    (ctx / "Dockerfile").unlink()
    os.mkfifo(ctx / "Dockerfile")
    writer = threading.Timer(1.0, _write_fifo, (ctx / "Dockerfile",))
    writer.start()
    try:
        with pytest.raises(BuildError, match="not a file of the build context"):
            await Builder(None, None, tmp_path / "build").build(ctx, BuildOptions(), print)
    finally:
        writer.cancel()
    # nor one out of the context, nor a FIFO, a .dockerignore the agent reads
    (ctx / ".dockerignore").symlink_to(host / "shadow")
    os.mkfifo(ctx / "x.fifo")
    assert context_files(ctx, True) == [".dockerignore", "Dockerfile", "x.fifo"]
    (ctx / ".dockerignore").unlink()
    os.mkfifo(ctx / ".dockerignore")
    assert context_files(ctx, True) == [".dockerignore", "Dockerfile", "x.fifo"]
    for name in (".dockerignore", "Dockerfile", "x.fifo"):
        (ctx / name).unlink()

    (host / "f").write_text("x")
    with tarfile.open(host / "keys.tar", "w") as tar:
        tar.add(host / "f", arcname="id_rsa")
    (ctx / "keys.tar").symlink_to(host / "keys.tar")
    (ctx / "in.tar").symlink_to("sub/real.tar")
    (ctx / "sub").mkdir()
    (ctx / "sub" / "real.tar").write_bytes((host / "keys.tar").read_bytes())
    files = context_files(ctx)
    ins = Instruction(2, "ADD", "keys.tar in.tar /dst/")
    assert sorted(context_sources(ctx, files, ins, ins.args)[0]) == [
        ("in.tar", "/dst", True), ("keys.tar", "/dst/keys.tar", False)]
    # the CLI sends a symlinked Dockerfile as the file it names (Docker's CLI reads it)
    from shoal.cli.build import pack_context

    (host / "Dockerfile.real").write_text("FROM scratch\n")
    (ctx / "Dockerfile").symlink_to(host / "Dockerfile.real")
    body, rel = pack_context(str(ctx), "")
    with body, tarfile.open(fileobj=body) as tar:
        member = tar.getmember(rel)
        assert member.isreg() and tar.extractfile(member).read() == b"FROM scratch\n"  # type: ignore[union-attr]


def _write_fifo(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # (never waits for a reader)
    os.write(fd, b"FROM scratch\n")
    time.sleep(0.5)
    os.close(fd)


def test_mount_stubs_are_removed_in_the_upper_dir_only(tmp_path: Path) -> None:
    """A RUN can move a stub's parent away (the mount goes with it) and leave a symlink to a
    host directory in its place: removing the stubs never follows it (review: a Dockerfile
    deleted the agent's host files, empty ones, as root)."""
    from shoal.runtime.buildmounts import remove_stubs, stub_paths

    layer, upper, host = tmp_path / "layer", tmp_path / "upper", tmp_path / "host"
    layer.mkdir()
    (host / "b").mkdir(parents=True)
    (host / "f").write_text("")
    stubs = stub_paths([layer], ["/a/b", "/q/f"])
    assert stubs == ["a/b", "q/f", "a", "q"]
    upper.mkdir()
    (upper / "a").symlink_to(host)  # (RUN mv /a /z && ln -s HOST /a)
    (upper / "q").symlink_to(host)
    remove_stubs(upper, stubs)
    assert (host / "b").is_dir() and (host / "f").is_file()
    assert (upper / "a").is_symlink()  # (the RUN's: layered as it left it)


def test_shell_and_maintainer_are_recorded_in_the_config() -> None:
    from shoal.node.health import resolve
    from shoal.raft.spec import HealthCheck
    from shoal.runtime.dockerfile import parse_shell
    from shoal.runtime.imageconfig import ImageConfig, ImageHealthcheck

    ins = parse_dockerfile('FROM a\nSHELL ["/bin/bash", "-o", "pipefail", "-c"]\n'
                           "MAINTAINER Jo <jo@example.com>\nSHELL bash\n")
    assert parse_shell(ins[1]) == ("/bin/bash", "-o", "pipefail", "-c")
    with pytest.raises(BuildError, match="SHELL needs a JSON array") as err:
        parse_shell(ins[3])
    assert err.value.line == 4
    cfg = ImageConfig(shell=("/bin/bash", "-c"), author="Jo")
    assert cfg.to_json()["Shell"] == ["/bin/bash", "-c"] and cfg.to_json()["Author"] == "Jo"
    assert ImageConfig.from_json(cfg.to_json()) == cfg
    assert "Shell" not in ImageConfig().to_json()  # (ids of images without it unchanged)
    # pushed as Docker has it (top-level "author"), and read back from a registry's config
    import json

    from shoal.runtime.imageconfig import ImageInfo
    from shoal.runtime.registry import image_config
    from shoal.runtime.regpush import oci_config

    doc = json.loads(oci_config(ImageInfo("sha256:x", (), (), 0, cfg), [], ("linux", "x", "")))
    assert doc["author"] == "Jo" and "Author" not in doc["config"]
    assert image_config(doc) == cfg
    check = resolve(HealthCheck(), ImageHealthcheck(test=("CMD-SHELL", "true")), cfg.shell)
    assert check is not None and check.argv == ("/bin/bash", "-c", "true")


async def test_cache_mount_sharing_locked_waits_private_gets_its_own(tmp_path: Path) -> None:
    """Two RUNs on one cache: ``locked`` runs them one after the other, ``private`` gives the
    second a fresh directory (thrown away after), ``shared`` the same directory at once."""
    import asyncio

    from shoal.runtime.buildmounts import run_mounts
    from shoal.runtime.dockerfile import RunMount

    ins = parse_dockerfile("FROM a\nRUN true\n")[1]
    (tmp_path / "tmp").mkdir()

    def no_layers(m: RunMount) -> list[Path]:
        return []

    async def hold(sharing: str, order: list[str], name: str, seen: list[str]) -> None:
        mount = RunMount("cache", "/c", id="x", sharing=sharing, mode=0o700, uid=1, gid=2)
        async with run_mounts(ins, [mount], tmp_path, tmp_path, tmp_path / "tmp",
                              no_layers) as specs:
            seen.append(specs[0].source)
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    for sharing, want in [("locked", ["a in", "a out", "b in", "b out"]),
                          ("shared", ["a in", "b in", "a out", "b out"]),
                          ("private", ["a in", "b in", "a out", "b out"])]:
        order: list[str] = []
        seen: list[str] = []
        await asyncio.gather(hold(sharing, order, "a", seen), hold(sharing, order, "b", seen))
        assert order == want, sharing
        assert (seen[0] == seen[1]) is (sharing != "private"), sharing
    kept = tmp_path / "cache"
    [cache] = kept.iterdir()
    st = cache.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o700", 1, 2)
    assert list((tmp_path / "tmp").iterdir()) == []  # (the private one is gone)


def test_run_mount_from_is_what_the_planner_resolved() -> None:
    """(Review: ``from=$SRC`` of a stage's ARG was "" when the stages were planned — the stage
    it names skipped — and the stage's name when the RUN ran, which then bound an empty
    directory without a word; ``from=$GLOBAL`` named the stage when planned and was the
    context when run.)"""
    from shoal.runtime.buildstages import check_mount_from, plan_stages
    from shoal.runtime.dockerfile import run_flags

    text = ("ARG GLOBAL=tools\nFROM a AS tools\nFROM b\nARG SRC=tools\n"
            "RUN --mount=type=bind,from=$SRC,target=/m --mount=type=bind,target=/c true\n"
            "RUN --mount=type=bind,from=$GLOBAL,target=/m --mount=type=bind,target=/c true\n")
    stages = plan_stages(parse_dockerfile(text)[1:], {"GLOBAL": "tools"})
    local, glob = stages[1].instructions[1:]
    env = {"SRC": "tools"}  # (the stage's, as the RUN runs: GLOBAL not declared in it)
    assert [m.from_ for m in check_mount_from(glob, run_flags(glob, env)[0], stages[1])] == [
        "tools", ""]
    with pytest.raises(BuildError, match="from=tools: a variable in from= must be a global "
                       "ARG") as err:
        check_mount_from(local, run_flags(local, env)[0], stages[1])
    assert err.value.line == 5
    # a value of the stage's ENV or ARG is the RUN's (review: target=$GOCACHE of an ENV was
    # "" when the stages were planned: "needs target=PATH", a Dockerfile BuildKit builds)
    text = "FROM golang\nENV GOCACHE=/go\nRUN --mount=type=cache,target=$GOCACHE go build\n"
    run = plan_stages(parse_dockerfile(text), {})[0].instructions[1]
    assert run_flags(run, {"GOCACHE": "/go"})[0][0].target == "/go"
    with pytest.raises(BuildError, match="line 2: RUN --mount: unknown option 'colour'"):
        plan_stages(parse_dockerfile("FROM a\nRUN --mount=target=$X,colour=red true\n"), {})


async def test_a_builders_unexpected_error_is_the_streams_last_record(tmp_path: Path) -> None:
    """(Review: an exception other than BuildError/ImageError/OSError — a KeyError, os.chown's
    OverflowError — ended the stream with no record: the CLI said only "the agent ended the
    build without a result".)"""
    from shoal.runtime.build import Builder, BuildOptions
    from shoal.runtime.buildrequest import stream_build

    class Broken(Builder):
        async def build(self, ctx: Path, opts: BuildOptions, emit: object) -> object:  # type: ignore[override]
            raise KeyError("x")

    recs = [r async for r in stream_build(Broken(None, None, tmp_path), tmp_path, BuildOptions())]
    assert recs == [{"error": "internal error: KeyError: 'x'", "line": 0}]


def test_copys_parent_directories_are_read_in_the_image_never_the_host(tmp_path: Path) -> None:
    """A layer's symlink ``/app -> HOSTDIR`` is the image's path, not the host's (review: COPY
    x /app/sub/ took the host's HOSTDIR/sub's mode, owner and time for its parent entry, and
    COPY/WORKDIR looked whether such a host directory exists)."""
    import io
    import tarfile

    from shoal.runtime.build import Builder, _image_dir

    layer, host = tmp_path / "layer", tmp_path / "host"
    (layer / "srv" / "sub").mkdir(parents=True)
    (layer / "srv" / "sub").chmod(0o750)
    (host / "sub").mkdir(parents=True)
    (host / "sub").chmod(0o700)
    (layer / "app").symlink_to(host)
    (layer / "www").symlink_to("/srv")
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
        Builder._parents(tar, "app/sub/f", [layer], set())
        Builder._parents(tar, "www/sub/f", [layer], set())
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes == {"app": 0o755, "app/sub": 0o755, "www": 0o755, "www/sub": 0o750}
    assert not _image_dir([layer], "app/sub") and _image_dir([layer], "www/sub")
    assert not _image_dir([layer], "www", follow=False) and _image_dir([layer], "www")
