"""Build secrets, adversarial inputs (review 96): a secrets part the agent must refuse with a
400 naming ``secret`` — never a 500 and a traceback in agent.log — and the ``env=`` wrapper,
which must not hand the RUN an empty variable when it cannot read a secret."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from shoal.node.errors import BadRequest
from shoal.node.imageapi import SECRETS_HEADER, _secrets_part
from shoal.runtime.build import BuildError
from shoal.runtime.buildmounts import SECRET_ENV_DIR, read_secrets, secret_files
from shoal.runtime.dockerfile import parse_dockerfile, run_flags


@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "-1", "1e3", " 12", "0"])
async def test_a_length_header_that_is_no_ascii_number_is_a_400(length: str) -> None:
    req = make_mocked_request("POST", "/v1/images/build", headers={SECRETS_HEADER: length})
    with pytest.raises(BadRequest, match=SECRETS_HEADER) as exc:
        await _secrets_part(req)
    assert exc.value.field == "secret"


def test_a_deeply_nested_secrets_part_is_refused_naming_the_field() -> None:
    for raw in (b"[" * 200_000, b'{"a":' * 200_000):
        with pytest.raises(BuildError, match="secrets part") as exc:
            read_secrets(raw)
        assert exc.value.field == "secret"


def _wrapper(tmp_path: Path, dockerfile_run: str, secrets: dict[str, bytes]) -> Path:
    """The env= wrapper and its files written under ``tmp_path`` (as the task's root)."""
    ins = parse_dockerfile(f"FROM a\n{dockerfile_run}\n")[1]
    argv, files = secret_files(ins, run_flags(ins, {}, "/")[0], secrets, ["env"])
    for target, value in files.items():
        path = tmp_path / target.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = value[0].replace(SECRET_ENV_DIR.encode(), str(tmp_path).encode()
                                + SECRET_ENV_DIR.encode())
        path.write_bytes(text)
        path.chmod(0o755)
    assert argv[0] == f"{SECRET_ENV_DIR}/env"
    return tmp_path / SECRET_ENV_DIR.lstrip("/") / "env"


def test_an_env_secret_named_path_does_not_empty_the_next_one(tmp_path: Path) -> None:
    """(failing before: the second secret's `cat` was looked up in the first one's PATH, and
    the RUN got TOKEN="" without a word)"""
    script = _wrapper(tmp_path, "RUN --mount=type=secret,id=p,env=PATH "
                      "--mount=type=secret,id=t,env=TOKEN true",
                      {"p": b"/nonexistent", "t": b"tok\n\n"})
    out = subprocess.run(["/bin/sh", str(script), "/usr/bin/env"], capture_output=True,
                         env={"PATH": "/usr/bin:/bin"}, check=True).stdout
    assert b"TOKEN=tok\n\n\n" in out and b"PATH=/nonexistent\n" in out


def test_an_env_secret_that_cannot_be_read_fails_the_run(tmp_path: Path) -> None:
    """(failing before: a `cat` the image lacks gave an empty variable and the RUN went on)"""
    script = _wrapper(tmp_path, "RUN --mount=type=secret,id=t,env=TOKEN true",
                      {"t": b"tok"})
    empty = tmp_path / "nobin"
    empty.mkdir()
    res = subprocess.run(["/bin/sh", str(script), "/usr/bin/env"], capture_output=True,
                         env={"PATH": str(empty)})
    assert res.returncode != 0 and b"TOKEN=" not in res.stdout
    assert b"secret t" in res.stderr and b"tok" not in res.stderr
    assert os.path.exists(script)


class _OldAgent:
    """An agent from before build secrets, as the CLI sees it: its info has no
    ``features``, and it would take the whole body for the context's tar — the secrets part
    written to its build directory's disk before the tar is found bad."""

    def __init__(self, features: list[str] | None = None) -> None:
        self.info: dict[str, object] = {"hostname": "n1", "version": "0.2.0"}
        if features is not None:
            self.info["features"] = features
        self.bodies: list[bytes] = []

    def call(self, method: str, path: str, body: object = None) -> object:
        assert (method, path) == ("GET", "/v1/info")
        return self.info

    def stream(self, path: str, method: str = "GET", body: object = None,
               headers: object = None) -> object:
        self.bodies.append(body.read())  # type: ignore[attr-defined]
        yield {"image": "sha256:" + "0" * 64}


def test_secrets_are_never_sent_to_an_agent_that_predates_them(tmp_path: Path) -> None:
    """(failing before: the CLI sent them, and such an agent wrote them to its disk)"""
    from shoal.cli.build import build_image
    from shoal.cli.errors import CliError

    (tmp_path / "Dockerfile").write_text("FROM a\n")
    old = _OldAgent()
    with pytest.raises(CliError, match="does not take build secrets") as exc:
        build_image(old, str(tmp_path), secrets={"tok": b"s3cr3t"})  # type: ignore[arg-type]
    assert old.bodies == [] and exc.value.field == "secret"
    assert "s3cr3t" not in str(exc.value)
    # one that says it takes them gets them; a build without secrets asks nothing
    new = _OldAgent(["build-secrets"])
    build_image(new, str(tmp_path), secrets={"tok": b"s3cr3t"})  # type: ignore[arg-type]
    assert len(new.bodies) == 1 and b"czNjcjN0" in new.bodies[0]
    build_image(old, str(tmp_path))  # type: ignore[arg-type]
    assert len(old.bodies) == 1


def test_the_agent_says_it_takes_build_secrets() -> None:
    from shoal.node.agent import FEATURES

    assert "build-secrets" in FEATURES
