"""Build secrets without a build: ``--secret``'s forms as docker buildx reads them, the
agent's checks of the secrets part of a build request, ``RUN --mount=type=secret``'s
options, and a secret's content kept out of the step's cache key."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from shoal.cli.build import _Body, parse_secret
from shoal.cli.errors import CliError
from shoal.runtime.build import BuildError, cache_key
from shoal.runtime.buildmounts import MAX_SECRET, mount_digest, read_secrets, secret_files
from shoal.runtime.dockerfile import RunMount, parse_dockerfile, run_flags


def test_secret_flag_forms_as_buildx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "npmrc").write_bytes(b"file-bytes\n")
    monkeypatch.chdir(tmp_path)
    env = {"GITHUB_TOKEN": "from-env", "npmrc": "the-variable"}
    assert parse_secret(f"id=npmrc,src={tmp_path}/npmrc", env) == ("npmrc", b"file-bytes\n")
    assert parse_secret(f"id=x,source={tmp_path}/npmrc,type=file", env)[1] == b"file-bytes\n"
    assert parse_secret("id=token,env=GITHUB_TOKEN", env) == ("token", b"from-env")
    assert parse_secret("id=t,type=env,src=GITHUB_TOKEN", env) == ("t", b"from-env")
    assert parse_secret("env=GITHUB_TOKEN", env) == ("GITHUB_TOKEN", b"from-env")
    assert parse_secret(f"src={tmp_path}/npmrc", env) == ("npmrc", b"file-bytes\n")
    # only an id: the variable of that name, else the file of that name
    assert parse_secret("id=npmrc", env) == ("npmrc", b"the-variable")
    assert parse_secret("id=npmrc", {}) == ("npmrc", b"file-bytes\n")
    assert parse_secret("id=npmrc,type=file", env) == ("npmrc", b"file-bytes\n")


@pytest.mark.parametrize(("spec", "words"), [
    ("v4lue", r"expected id=ID.*\(an item without '='\)"),
    ("id=x,colour=red", "no option 'colour'"),
    ("id=x,type=ssh", "type=ssh is not file or env"),
    ("id=a/b,env=T", "id 'a/b' is not a secret id"),
    ("type=env", "--secret needs id=ID"),
    ("id=x,env=UNSET_VAR", "the environment variable UNSET_VAR is not set"),
    ("id=x,src=/nonexistent/f", "cannot read /nonexistent/f"),
    ("id=x,src=/f,env=T", "src= or env=, not both"),
    ("id=big,env=BIG", "more than 512000 bytes"),
])
def test_bad_secret_flags_name_the_flag_and_never_the_value(spec: str, words: str) -> None:
    with pytest.raises(CliError, match=words) as exc:
        parse_secret(spec, {"T": "v4lue", "BIG": "s" * (MAX_SECRET + 1)})
    assert exc.value.field == "secret" and "v4lue" not in str(exc.value)


def test_the_request_body_is_the_secrets_part_then_the_tar(tmp_path: Path) -> None:
    tar = tmp_path / "t"
    tar.write_bytes(b"TAR")
    with open(tar, "rb") as fh:
        body = _Body(b"0123456789", fh)
        assert [body.read(4), body.read(4), body.read(4), body.read(4), body.read(4)] == [
            b"0123", b"4567", b"89", b"TAR", b""]


def _part(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_the_agent_checks_the_secrets_part_naming_the_secret() -> None:
    ok = {"npmrc": base64.b64encode(b"\x00bytes\n").decode()}
    assert read_secrets(_part(ok)) == {"npmrc": b"\x00bytes\n"}
    assert read_secrets(b"") == {}
    bad = [(b"{not json", "not JSON"), (_part(["x"]), "must map"),
           (_part({"a/b": ""}), "'a/b' is not one"),
           (_part({"k": "!!notb64"}), "secret k: its value is not base64"),
           (_part({"k": 3}), "secret k: its value is not base64"),
           (_part({"big": base64.b64encode(b"s" * (MAX_SECRET + 1)).decode()}),
            "secret big is 512001 bytes: at most 512000"),
           (_part({f"s{i}": "" for i in range(65)}), "at most 64")]
    for raw, words in bad:
        with pytest.raises(BuildError, match=words) as exc:
            read_secrets(raw)
        assert exc.value.field == "secret" and "sssss" not in str(exc.value)


def test_secret_mount_options_as_buildkit_reads_them() -> None:
    ins = parse_dockerfile("FROM a\nRUN --mount=type=secret,id=npmrc,target=.npmrc,"
                           "required=true,mode=0440,uid=1000,gid=100 "
                           "--mount=type=secret,id=tok,env=TOK "
                           "--mount=type=secret,target=/etc/key.pem "
                           "--mount=type=secret,id=both,env=B,target=/b make\n")[1]
    mounts = run_flags(ins, {}, "/app")[0]
    assert mounts == [
        RunMount("secret", "/app/.npmrc", id="npmrc", mode=0o440, uid=1000, gid=100,
                 readonly=True, required=True),
        RunMount("secret", "", id="tok", mode=0o400, readonly=True, env="TOK"),
        RunMount("secret", "/etc/key.pem", id="key.pem", mode=0o400, readonly=True),
        RunMount("secret", "/b", id="both", mode=0o400, readonly=True, env="B")]
    assert run_flags(parse_dockerfile("FROM a\nRUN --mount=type=secret,id=x true\n")[1]
                     )[0][0].target == "/run/secrets/x"
    # the files the RUN's task gets; a variable through the wrapper; a missing one skipped
    argv, files = secret_files(ins, mounts, {"npmrc": b"val-N", "tok": b"val-T",
                                             "both": b"val-B"}, ["/bin/sh", "-c", "make"])
    assert argv == ["/.shoal-secret-env/env", "/bin/sh", "-c", "make"]
    assert files["/app/.npmrc"] == (b"val-N", 0o440, 1000, 100) and files["/b"][0] == b"val-B"
    assert "/etc/key.pem" not in files and files["/.shoal-secret-env/0"] == (b"val-T", 0o400)
    script = files["/.shoal-secret-env/env"][0]
    assert b"export TOK" in script and b"export B" in script and b"val-" not in script
    with pytest.raises(BuildError, match=r"line 2: .*secret 'npmrc' is required"):
        secret_files(ins, mounts[:1], {}, ["true"])


def test_a_secrets_content_is_not_in_the_cache_key(tmp_path: Path) -> None:
    """BuildKit's: the mount's id and options are in the key, its content is not — a changed
    secret does not rebuild (the docs say so)."""
    ins = parse_dockerfile("FROM a\nRUN --mount=type=secret,id=x true\n")[1]
    mounts = run_flags(ins, {}, "/")[0]
    digest = mount_digest(tmp_path, mounts, {}, 2)
    other = mount_digest(tmp_path, run_flags(parse_dockerfile(
        "FROM a\nRUN --mount=type=secret,id=y true\n")[1], {}, "/")[0], {}, 2)
    assert digest != other  # (another id: another step)
    assert cache_key("p", ins, ins.args, {}, digest) == cache_key("p", ins, ins.args, {},
                                                                   digest)
