"""`shoal cp` (docker cp / kubectl cp) against a real agent on a netns host: files and
directories out of a running task and into it, by Docker's rules for where a copy lands; the
tar archive on stdout; ownership (root's in the task, or kept with -a); what a task sends is
unpacked as untrusted (an absolute symlink kept as a link, never followed; setuid bits
cleared; a FIFO refused); errors name the missing path. The task runs the node's own root
filesystem (read-only, with GNU tar) and writes under a tmpfs at /data."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab import CommandError, Host, Lab, wait_until
from shoal.cli.cp import NO_TAR, _failed, split

pytestmark = pytest.mark.netns

SETUP = ("mkdir -p /data/d/sub && echo hello > /data/d/a.txt && echo deep > /data/d/sub/b && "
         "ln -s /etc/passwd /data/d/abs && chmod 4755 /data/d/a.txt && mkdir /data/in && "
         "mkfifo /data/fifo && touch /data/ready; exec sleep 100000")


@pytest.fixture(scope="module")
def box() -> Iterator[Host]:
    lab = Lab(1)
    try:
        lab.form_cluster(managers=1)
        h = lab.hosts[0]
        h.cli("service", "create", "--name", "box", "--mount", "type=tmpfs,dst=/data", "--",
              "sh", "-c", SETUP)
        wait_until(lambda: h.cli("exec", "box.1", "test", "-e", "/data/ready").returncode == 0,
                   timeout=60, what="box ready")
        yield h
    finally:
        left = lab.close()
        assert not left, f"lab teardown left things behind: {left}"


def in_task(h: Host, *cmd: str) -> str:
    return h.cli("exec", "box.1", *cmd).stdout


def test_a_directory_comes_out_whole_and_untrusted_parts_are_made_harmless(
        box: Host, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = box.cli("cp", "box.1:/data/d", str(out))
    assert "Successfully copied" in res.stderr and str(out) in res.stderr
    assert (out / "a.txt").read_text() == "hello\n" and (out / "sub" / "b").read_text() == "deep\n"
    assert os.readlink(out / "abs") == "/etc/passwd"  # (the link itself, not the host's file)
    assert not (out / "a.txt").stat().st_mode & stat.S_ISUID  # (setuid cleared)
    # into an existing directory: DEST/NAME; a file to a new name; a directory's contents
    box.cli("cp", "box.1:/data/d", str(out))
    assert (out / "d" / "sub" / "b").read_text() == "deep\n"
    box.cli("cp", "box.1:data/d/a.txt", str(tmp_path / "renamed.txt"))  # (relative: from /)
    assert (tmp_path / "renamed.txt").read_text() == "hello\n"
    box.cli("cp", "box.1:/data/d/.", str(tmp_path / "contents"))
    assert sorted(p.name for p in (tmp_path / "contents").iterdir()) == ["a.txt", "abs", "sub"]
    # `-`: the tar archive on stdout
    raw = subprocess.run([*box.shoal_argv, "-H", f"unix://{box.sock}", "cp",
                          "box.1:/data/d/sub", "-"], capture_output=True, check=True,
                         timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        assert sorted(t.getnames()) == ["sub", "sub/b"]


def test_files_and_directories_go_in_owned_by_the_tasks_root_unless_archive(
        box: Host, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "f.txt").write_text("local\n")
    (src / "inner" / "g").write_text("g\n")
    os.chown(src / "f.txt", 1234, 1234)
    box.cli("cp", str(src / "f.txt"), "box.1:/data/copied.txt")
    assert in_task(box, "cat", "/data/copied.txt") == "local\n"
    assert in_task(box, "stat", "-c", "%u:%g", "/data/copied.txt").strip() == "0:0"
    box.cli("cp", "-a", str(src / "f.txt"), "box.1:/data/in/")
    assert in_task(box, "stat", "-c", "%u:%g", "/data/in/f.txt").strip() == "1234:1234"
    box.cli("cp", str(src), "box.1:/data/in")  # an existing directory: into it
    assert in_task(box, "cat", "/data/in/src/inner/g") == "g\n"
    box.cli("cp", str(src), "box.1:/data/newdir")  # a new name: the directory becomes it
    assert in_task(box, "cat", "/data/newdir/inner/g") == "g\n"


def test_errors_name_what_is_missing_and_what_was_refused(box: Host, tmp_path: Path) -> None:
    def error(*argv: str) -> str:
        with pytest.raises(CommandError) as err:
            box.cli("cp", *argv)
        return err.value.stderr

    assert "/data/nope" in error("box.1:/data/nope", str(tmp_path / "x"))
    assert "No such file" in error("box.1:/data/nope", str(tmp_path / "x"))
    assert "no such file" in error(str(tmp_path / "missing"), "box.1:/data/")
    assert "one of SRC and DEST" in error(str(tmp_path / "a"), str(tmp_path / "b"))
    assert "refused" in error("box.1:/data/fifo", str(tmp_path / "fifo"))
    assert not (tmp_path / "fifo").exists()
    assert "no such directory" in error("box.1:/data/d/a.txt", str(tmp_path / "no" / "x"))
    assert "no task" in error("nosuch.1:/data/d", str(tmp_path / "y")).lower()


def test_task_paths_and_tar_failures() -> None:
    assert split("web.1:/etc/x") == ("web.1", "/etc/x")
    assert split("./a:b") == (None, "./a:b") and split("/tmp/a:b") == (None, "/tmp/a:b")
    assert split("file.txt") == (None, "file.txt")
    assert str(_failed("cannot copy", 127, "exec: tar: not found")) == NO_TAR
    assert str(_failed("cannot copy t:/x", 2, "tar: /x: Cannot stat: No such file or "
                       "directory\ntar: Exiting with failure status due to previous errors")
               ) == "cannot copy t:/x: /x: Cannot stat: No such file or directory"


def test_a_crafted_archive_from_a_task_writes_nothing_outside_the_destination(
        tmp_path: Path) -> None:
    """The task's tar could be anything: a link out of the destination and a file through
    it, an absolute name, a name climbing with .. — each refused, nothing written there."""
    from shoal.cli.cp import unpack

    outside = tmp_path / "outside"
    outside.mkdir()

    def archive(*members: tuple[str, str]) -> io.BytesIO:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, link in members:
                info = tarfile.TarInfo(name)
                if link:
                    info.type, info.linkname = tarfile.SYMTYPE, link
                    t.addfile(info)
                else:
                    info.size = 4
                    t.addfile(info, io.BytesIO(b"evil"))
        buf.seek(0)
        return buf

    crafted = [archive(("x/link", str(outside)), ("x/link/evil", "")),
               archive(("/abs", "")),  # (stored as "abs", in the staging directory only)
               archive(("x/../../outside/evil", ""))]
    for buf in crafted:
        with pytest.raises(Exception, match="refused") as err:
            unpack(buf, tmp_path / "dest", "x", False, False)
        assert err.type.__name__ == "CliError"
        assert list(outside.iterdir()) == [], err.value
    assert not (tmp_path / "dest").exists() and [p.name for p in tmp_path.iterdir()] == [
        "outside"]  # (no staging directory left either)


def _crafted(*members: tarfile.TarInfo, data: bytes = b"evil\n") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for info in members:
            if info.isreg():
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    buf.seek(0)
    return buf


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_a_hard_link_in_a_tasks_archive_never_reaches_a_file_outside(tmp_path: Path) -> None:
    """tarfile's ``tar`` filter (Python before 3.12.11/3.13.4) checks no hard link's target:
    ``x/h`` linked to an absolute path outside became that file in the staging directory, the
    member's mode was set on it, and a regular ``x/h`` after it wrote through it."""
    from shoal.cli.cp import unpack

    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    for target in (str(victim), "../victim", "x/../../victim"):
        buf = _crafted(_member("x", tarfile.DIRTYPE, mode=0o755),
                       _member("x/h", tarfile.LNKTYPE, target, mode=0o755), _member("x/h"))
        with pytest.raises(Exception, match="refused") as err:
            unpack(buf, tmp_path / "dest", "x", False, False)
        assert err.type.__name__ == "CliError"
        assert victim.read_text() == "secret\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
    # a hard link to a file of the archive itself still unpacks
    buf = _crafted(_member("x", tarfile.DIRTYPE, mode=0o755), _member("x/a"),
                   _member("x/h", tarfile.LNKTYPE, "x/a"))
    unpack(buf, tmp_path / "dest", "x", False, False)
    assert (tmp_path / "dest" / "h").read_text() == "evil\n"


def test_a_second_copy_never_writes_through_links_the_first_one_left(tmp_path: Path) -> None:
    """A task's links are kept as links (as Docker's cp does), so copying again into the same
    place must replace them, never write through them: the first copy leaves DEST/f ->
    victim and DEST/sub -> outside, the second sends f and sub/g as a file and a directory."""
    from shoal.cli.cp import unpack

    outside, victim = tmp_path / "outside", tmp_path / "victim"
    outside.mkdir()
    victim.write_text("secret\n")
    dest = tmp_path / "dest"
    first = _crafted(_member(".", tarfile.DIRTYPE, mode=0o755),
                     _member("./f", tarfile.SYMTYPE, str(victim)),
                     _member("./sub", tarfile.SYMTYPE, str(outside)))
    unpack(first, dest, ".", True, False)
    assert os.readlink(dest / "f") == str(victim)
    second = _crafted(_member(".", tarfile.DIRTYPE, mode=0o755), _member("./f"),
                      _member("./sub", tarfile.DIRTYPE, mode=0o755), _member("./sub/g"))
    unpack(second, dest, ".", True, False)
    assert victim.read_text() == "secret\n" and list(outside.iterdir()) == []
    assert (dest / "f").read_text() == "evil\n" and not (dest / "f").is_symlink()
    assert (dest / "sub" / "g").read_text() == "evil\n" and not (dest / "sub").is_symlink()



def test_archive_keeps_the_owners_of_a_directorys_files_copied_out(tmp_path: Path) -> None:
    """``-a`` out of a task: a directory's files keep the uid/gid the task's tar gave them
    (a copy of the staging tree gave every file the caller's)."""
    from shoal.cli.cp import unpack

    if os.getuid() != 0:
        pytest.skip("only root can give a file another owner")
    owned = _member("x/f")
    owned.uid = owned.gid = 1234
    unpack(_crafted(_member("x", tarfile.DIRTYPE, mode=0o755), owned), tmp_path / "dest", "x",
           False, True)
    st = (tmp_path / "dest" / "f").stat()
    assert (st.st_uid, st.st_gid) == (1234, 1234)



def test_an_unreadable_directory_from_a_task_is_copied_with_its_mode(tmp_path: Path) -> None:
    """A directory the task sends as mode 0000 is still copied out whole by a user without
    CAP_DAC_OVERRIDE (copytree could not read it in the staging directory), gets its mode
    at the destination, and no staging directory is left behind (rmtree could not enter
    it). Run as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    import sys

    if os.getuid() != 0:
        pytest.skip("needs root to drop the capabilities")
    (tmp_path / "a.tar").write_bytes(_crafted(
        _member("x", tarfile.DIRTYPE, mode=0o755), _member("x/locked", tarfile.DIRTYPE, mode=0),
        _member("x/locked/f")).getvalue())
    script = ("from pathlib import Path; from shoal.cli.cp import unpack; "
              "unpack(open('a.tar', 'rb'), Path('dest'), 'x', False, False)")
    res = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                          sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE((tmp_path / "dest" / "locked").stat().st_mode) == 0
    assert (tmp_path / "dest" / "locked" / "f").read_text() == "evil\n"  # (root reads it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "dest"]


def test_a_name_that_looks_like_an_option_is_copied_out(box: Host, tmp_path: Path) -> None:
    """A task file named ``-rf`` (or ``--to-command=…``) is a name to tar, not an option:
    GNU tar took it as one ("You may not specify more than one '-Acdtrux'...")."""
    box.cli("exec", "box.1", "sh", "-c", "echo opt > /data/-rf && mkdir -p /data/--x")
    box.cli("cp", "box.1:/data/-rf", str(tmp_path / "got"))
    assert (tmp_path / "got").read_text() == "opt\n"
    box.cli("cp", "box.1:/data/--x", str(tmp_path / "dir"))
    assert (tmp_path / "dir").is_dir()


def test_a_task_path_is_named_as_written() -> None:
    """An absolute task path keeps one leading slash (normpath keeps POSIX's two of
    "/" + "/etc": messages and the Successfully copied line said TASK://etc/x)."""
    from shoal.cli.cp import _in_task

    assert _in_task("/etc/x") == "/etc/x" and _in_task("etc/x/") == "/etc/x/"
    assert _in_task("//etc/../x") == "/x" and _in_task("/") == "/"


def test_follow_link_copies_the_target_under_the_links_name(box: Host, tmp_path: Path) -> None:
    """``-L ./current`` (a link to releases/v2) into a task's directory lands as
    DIR/current, as Docker's does (it took the target's name: DIR/v2)."""
    (tmp_path / "releases" / "v2").mkdir(parents=True)
    (tmp_path / "releases" / "v2" / "app").write_text("v2\n")
    (tmp_path / "current").symlink_to("releases/v2")
    box.cli("exec", "box.1", "mkdir", "-p", "/data/follow")
    box.cli("cp", "-L", str(tmp_path / "current"), "box.1:/data/follow")
    assert in_task(box, "cat", "/data/follow/current/app") == "v2\n"


def test_a_file_to_a_missing_directory_written_with_a_slash_is_refused(
        box: Host, tmp_path: Path) -> None:
    """Docker's rule both ways: a file to DEST/ that does not exist is an error ("the
    destination directory must exist"), not a file named DEST; a directory makes it."""
    with pytest.raises(CommandError) as err:
        box.cli("cp", "box.1:/data/d/a.txt", f"{tmp_path / 'newdir'}/")
    assert "no such directory" in err.value.stderr and not (tmp_path / "newdir").exists()
    box.cli("cp", "box.1:/data/d/sub", f"{tmp_path / 'made'}/")
    assert (tmp_path / "made" / "b").read_text() == "deep\n"
    (tmp_path / "f").write_text("f\n")
    with pytest.raises(CommandError) as err:
        box.cli("cp", str(tmp_path / "f"), "box.1:/data/nodir/")
    assert "no such directory" in err.value.stderr
    assert box.cli("exec", "box.1", "test", "-e", "/data/nodir", check=False).returncode == 1


def test_an_archive_that_cannot_be_unpacked_is_an_error_not_a_traceback(
        tmp_path: Path) -> None:
    """A task's archive with a file where a directory must be (x/f, then x/f/g):
    one error line naming the place, no OSError."""
    from shoal.cli.cp import unpack

    buf = _crafted(_member("x", tarfile.DIRTYPE, mode=0o755), _member("x/f"), _member("x/f/g"))
    with pytest.raises(Exception, match="x/f") as err:
        unpack(buf, tmp_path / "dest", "x", False, False)
    assert err.type.__name__ == "CliError"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_copy_out_unpacks_on_the_pythons_shoal_supports(tmp_path: Path) -> None:
    """shoal needs Python >= 3.11 and the Ansible role makes its venv from /usr/bin/python3
    (Debian 12: 3.11.2), which has no extraction filters (tarfile.tar_filter and
    extractall's filter= came in 3.11.4): every copy out of a task failed there. Unpack a
    directory with that interpreter, and refuse a crafted hard link with it too."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip("no /usr/bin/python3")
    pkg = tmp_path / "pkg" / "shoal"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli").symlink_to(Path(__file__).resolve().parent.parent / "cli")
    good = _crafted(_member("x", tarfile.DIRTYPE, mode=0o555), _member("x/f", mode=0o4755))
    (tmp_path / "good.tar").write_bytes(good.getvalue())
    (tmp_path / "victim").write_text("secret\n")
    (tmp_path / "bad.tar").write_bytes(_crafted(
        _member("x", tarfile.DIRTYPE), _member("x/h", tarfile.LNKTYPE, str(tmp_path / "victim")),
        _member("x/h")).getvalue())
    script = ("import sys; sys.path.insert(0, 'pkg'); from pathlib import Path; "
              "from shoal.cli.cp import unpack; from shoal.cli.errors import CliError\n"
              "unpack(open('good.tar', 'rb'), Path('dest'), 'x', False, False)\n"
              "try:\n    unpack(open('bad.tar', 'rb'), Path('bad'), 'x', False, False)\n"
              "except CliError as exc:\n    print(exc)\n")
    res = subprocess.run([str(system), "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "refused" in res.stdout and (tmp_path / "victim").read_text() == "secret\n"
    assert (tmp_path / "dest" / "f").read_text() == "evil\n"
    assert stat.S_IMODE((tmp_path / "dest").stat().st_mode) == 0o555
    assert stat.S_IMODE((tmp_path / "dest" / "f").stat().st_mode) == 0o755  # (no setuid)
