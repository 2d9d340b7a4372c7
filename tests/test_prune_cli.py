"""`shoal network prune` / `shoal volume prune` (cli/prune.py) against a stand-in client:
only objects nothing uses go, after docker's question unless -f; one the manager refuses
(used since the list) is said and kept."""

from __future__ import annotations

import io
from typing import Any

import pytest

from shoal.cli import output
from shoal.cli.errors import CliError
from shoal.cli.prune import prune


class Client:
    def __init__(self, objects: list[dict[str, Any]], busy: str = "") -> None:
        self.objects, self.busy, self.deleted = objects, busy, []  # type: ignore[var-annotated]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if method == "GET":
            return self.objects
        name = path.rsplit("/", 1)[1]
        if name == self.busy:
            raise CliError(f"volume {name} is in use by service x")
        self.deleted.append(name)
        return {"removed": True}


OBJECTS = [{"name": "free"}, {"name": "used", "services": ["web"]},
           {"name": "tasked", "services": [], "tasks": {"t1": "10.0.0.2"}},
           {"name": "made", "implicit": True, "services": ["db"]}, {"name": "raced"}]


def test_only_unused_objects_go_and_a_refused_one_is_said(
        capsys: pytest.CaptureFixture[str]) -> None:
    c = Client(OBJECTS, busy="raced")
    assert prune(c, "/v1/volumes", "Volumes", force=True) == ["free"]
    assert c.deleted == ["free"]
    out, err = capsys.readouterr()
    assert out == "Deleted Volumes:\nfree\n" and "raced: volume raced is in use" in err


def test_without_force_it_asks_and_only_yes_goes_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for answer, expected in (("n\n", []), ("\n", []), ("y\n", ["free"]), ("yes\n", ["free"])):
        monkeypatch.setattr("sys.stdin", io.StringIO(answer))
        c = Client(OBJECTS[:1])
        assert prune(c, "/v1/networks", "Networks", force=False) == expected
        assert "Are you sure you want to continue? [y/N]" in capsys.readouterr().err


def test_a_volume_prune_takes_what_it_is_told_to_and_dangling_is_the_same_rule(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`volume prune` without -a (Docker 23's): the anonymous volumes only; `volume ls -f
    dangling=true` lists what a prune would consider."""
    objs = [*OBJECTS, {"name": "a" * 64, "anonymous": True}]
    c = Client(objs)
    assert prune(c, "/v1/volumes", "Volumes", True, lambda v: bool(v.get("anonymous"))) == [
        "a" * 64]
    dangling = output.parse_filters(["dangling=true"], "volume")
    assert [o["name"] for o in objs if output.matches(o, dangling, "volume")] == [
        "free", "raced", "a" * 64]
    kept = output.parse_filters(["dangling=0"], "volume")
    assert [o["name"] for o in objs if output.matches(o, kept, "volume")] == [
        "used", "tasked", "made"]
    with pytest.raises(CliError, match="invalid dangling 'yes'"):
        output.parse_filters(["dangling=yes"], "volume")
