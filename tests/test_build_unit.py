"""shoal.runtime.build without a runtime: the Dockerfile parser (continuations, comments,
errors with line numbers), variable expansion, ENV/LABEL pairs, HEALTHCHECK, .dockerignore and
the layer-cache keys."""

from __future__ import annotations

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
    ("FROM a\nFROM b\n", 2, "multi-stage"),
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
    assert opts.dockerfile == "sub/Dockerfile" and opts.no_cache
    for query, fld in (([("t", "Bad Tag")], "t"), ([("buildarg", "novalue")], "buildarg"),
                       ([("dockerfile", "../x")], "dockerfile"), ([("label", "a")], "label"),
                       ([("network", "bridge")], "network")):
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
    real = tarfile.TarFile.add

    def add(self: tarfile.TarFile, name: str, *args: object, **kwargs: object) -> None:
        if name.endswith("secret"):
            raise PermissionError(13, "Permission denied", name)
        real(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "add", add)
    with pytest.raises(PermissionError):
        build.pack_context(str(ctx), "")
    assert os.listdir(tmp) == []
