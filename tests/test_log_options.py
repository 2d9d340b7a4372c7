"""Docker's per-service log settings: ``--log-driver`` and ``--log-opt max-size=…,max-file=…``
(Compose's ``logging:``) — the spec's rules, the CLI's create and update flags (docker's update
replaces the options), Compose, the cluster-schema gate, TaskConfig's form, and what a real
task's shim keeps with them.

The real task needs root (namespaces, cgroups), the end-to-end check network namespaces too.
Fixtures: tests/test_runtime_support.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runtime_support import needs_root, run_to_end, task

from netlab import Lab, wait_until
from shoal.cli import specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.main import build_parser
from shoal.raft.errors import ValidationError
from shoal.raft.models import to_dict
from shoal.raft.spec import log_limits
from shoal.raft.validate import validate_spec
from shoal.runtime.errors import InvalidTaskConfig
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig, TaskConfig

pytest_plugins = ("test_runtime_support",)  # its fixtures


def _spec(**container: Any) -> dict[str, Any]:
    return {"name": "web", "task": {"container": {"command": ["sleep", "9"], **container}}}


# ------------------------------------------------------------------------- the rules (pure)

def test_json_file_and_local_mean_shoals_files_with_dockers_sizes() -> None:
    """Docker's json-file and local drivers (what its `service logs` reads) are shoal's own
    files; max-size takes Docker's size syntax in binary units, max-file a count."""
    for driver in ("", "json-file", "local"):
        c = validate_spec(_spec(log_driver=driver, log_options={"max-size": "10m",
                                                                "max-file": "3"})).task.container
        assert c.log_driver == driver and log_limits(c.log_options) == (10 << 20, 3)
    for size, expected in (("10m", 10 << 20), ("1g", 1 << 30), ("512k", 512 << 10),
                           ("8192", 8192), ("10MB", 10 << 20), ("2MiB", 2 << 20),
                           ("1.5m", 3 << 19)):
        assert log_limits({"max-size": size}) == (expected, 0), size
    assert log_limits({}) == (0, 0)  # (the node's own)


@pytest.mark.parametrize(("container", "field", "words"), [
    ({"log_driver": "syslog"}, "task.container.log_driver", "files on its node"),
    ({"log_driver": "none"}, "task.container.log_driver", "json-file and local"),
    ({"log_options": {"compress": "true"}}, "task.container.log_options",
     "'compress' is not supported: shoal's log files take max-size and max-file"),
    ({"log_options": {"tag": "{{.Name}}"}}, "task.container.log_options", "'tag'"),
    ({"log_options": {"max-size": "10x"}}, "task.container.log_options",
     "max-size: expected a size"),
    ({"log_options": {"max-size": "1k"}}, "task.container.log_options", "at least 4k"),
    ({"log_options": {"max-size": "-1"}}, "task.container.log_options", "max-size"),
    ({"log_options": {"max-file": "0"}}, "task.container.log_options", "max-file"),
    ({"log_options": {"max-file": "three"}}, "task.container.log_options", "max-file"),
])  # fmt: skip
def test_a_bad_log_setting_is_refused_naming_its_field(container: dict[str, Any], field: str,
                                                       words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_spec(_spec(**container))
    assert exc.value.field == field and words in exc.value.message, exc.value.message


def test_the_log_settings_wait_for_cluster_schema_7() -> None:
    """A spec using them is refused naming the field while an older node may read it; one
    leaving them at their defaults is written without them (an older decoder reads it)."""
    from shoal.raft.schema import encode_command

    cmd = {"op": "service_create", "id": "s1", "now": 1.0,
           "spec": _spec(log_options={"max-file": "2"})}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 6)
    assert exc.value.field == "task.container.log_options"
    cmd = {**cmd, "spec": _spec(log_driver="local")}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 6)
    assert exc.value.field == "task.container.log_driver"
    plain = {**cmd, "spec": to_dict(validate_spec(_spec()))}
    written = encode_command(plain, {}, 6)["spec"]["task"]["container"]
    assert not {"log_driver", "log_options"} & written.keys()
    assert encode_command(cmd, {}, 7) == cmd


# ------------------------------------------------------------------------- the CLI, Compose

def test_log_flags_as_dockers_on_create_and_update() -> None:
    """create: --log-driver, --log-opt K=V (repeated); update: docker's --log-opt replaces
    every option (and --log-driver alone clears them, docker's updateLogDriver), while
    --log-opt-add/--log-opt-rm change one."""
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "web", "--log-driver", "json-file",
                         "--log-opt", "max-size=10m", "--log-opt", "max-file=3", "--",
                         "sleep", "9"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    c = spec.task.container
    assert c.log_driver == "json-file" and c.log_options == {"max-size": "10m", "max-file": "3"}

    def update(*flags: str) -> Any:
        args = p.parse_args(["service", "update", *flags, "web"])
        return validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container

    new = update("--log-opt", "max-size=1m")
    assert new.log_driver == "json-file" and new.log_options == {"max-size": "1m"}
    new = update("--log-driver", "local", "--log-opt", "max-file=2")
    assert new.log_driver == "local" and new.log_options == {"max-file": "2"}
    new = update("--log-driver", "local")
    assert new.log_driver == "local" and new.log_options == {}
    new = update("--log-opt-add", "max-file=5", "--log-opt-rm", "max-size")
    assert new.log_options == {"max-file": "5"}
    new = update("--env-add", "A=1")  # (no log flag: the options stay)
    assert new.log_options == {"max-size": "10m", "max-file": "3"}


def test_compose_logging_becomes_the_containers_log_settings(tmp_path: Path) -> None:
    """``logging: {driver, options}`` as Swarm reads it (a number for max-file too); a bad
    driver or option names its key."""
    text = """
services:
  web:
    image: nginx:1
    logging:
      driver: json-file
      options: {max-size: 10m, max-file: 3}
  api:
    image: api:1
    logging:
      options:
        max-size: "512k"
"""
    (tmp_path / "compose.yml").write_text(text)
    st = load_stack("app", [tmp_path / "compose.yml"], {})
    web, api = (next(s for s in st.services if s.name == f"app_{k}").task.container
                for k in ("web", "api"))
    assert web.log_driver == "json-file" and web.log_options == {"max-size": "10m",
                                                                 "max-file": "3"}
    assert api.log_driver == "" and api.log_options == {"max-size": "512k"}
    assert not any("logging" in w for w in st.warnings)
    # another driver or option deploys, warned about and left out (real stacks name gelf or
    # compress: docker stack deploy takes them); an unknown key is an error naming it
    for other, said in (("      driver: syslog", "logging.driver: syslog: not supported"),
                        ("      options: {compress: 'true'}",
                         "logging.options.compress: not supported")):
        (tmp_path / "compose.yml").write_text(
            f"services:\n  web:\n    image: web:1\n    logging:\n{other}\n")
        st = load_stack("app", [tmp_path / "compose.yml"], {})
        assert st.services[0].task.container.log_driver == "" and \
            st.services[0].task.container.log_options == {}
        assert any(said in w for w in st.warnings), st.warnings
    (tmp_path / "compose.yml").write_text(
        "services:\n  web:\n    image: web:1\n    logging:\n      bogus: 1\n")
    with pytest.raises(ComposeError) as exc:
        load_stack("app", [tmp_path / "compose.yml"], {})
    assert exc.value.path == "services.web.logging.bogus", exc.value


# ------------------------------------------------------------------------- the runtime

def test_a_task_config_keeps_its_log_limits_and_reads_an_older_one() -> None:
    cfg = TaskConfig(task_id="t1", hostname="h", command=("true",), env={},
                     log_max_bytes=8192, log_max_files=2)
    cfg.validate()
    assert TaskConfig.from_json(cfg.to_json()) == cfg
    old = cfg.to_json().replace('"log_max_bytes": 8192, "log_max_files": 2, ', "")
    assert "log_max" not in old  # (a config.json written before them)
    back = TaskConfig.from_json(old)
    assert (back.log_max_bytes, back.log_max_files) == (0, 0)
    for bad in ({"log_max_bytes": 100}, {"log_max_bytes": -1}, {"log_max_files": -1},
                {"log_max_files": 1000}):
        with pytest.raises(InvalidTaskConfig) as exc:
            dataclasses.replace(cfg, **bad).validate()
        assert exc.value.field == next(iter(bad))


LINES = "i=0; while [ $i -lt 640 ]; do i=$((i+1)); echo line-$i-of-forty-bytes-or-so-pad; done"


@needs_root
async def test_a_tasks_own_log_limits_bound_what_its_shim_keeps(
        config: RuntimeConfig, data_dir: Path) -> None:
    """~40 KiB of output with log_max_bytes=8192, log_max_files=2: at most 2 files per
    stream, each within 8 KiB (the runtime's own 4096 bytes, 5 files would keep 5 files), and the
    newest lines are still read, --tail included."""
    ctl = ProcessController(dataclasses.replace(config, log_max_bytes=4096, log_max_files=5))
    try:
        own = dataclasses.replace(task("own", "sh", "-c", LINES), log_max_bytes=8192,
                                  log_max_files=2)
        st, out, _ = await run_to_end(ctl, own)
        assert st.exit_code == 0
        files = sorted((data_dir / "tasks" / "own").glob("stdout.log*"))
        assert [p.name for p in files] == ["stdout.log", "stdout.log.1"]
        sizes = [p.stat().st_size for p in files]
        assert all(size <= 8192 for size in sizes) and max(sizes) > 4096, sizes
        numbers = [int(line.split("-")[1]) for line in out.splitlines()]
        assert numbers == list(range(numbers[0], 641)) and numbers[0] > 1
        assert [x.line.split("-")[1] for x in ctl.read_logs("own", tail=2)] == ["639", "640"]
        # the same output under the runtime's own limits keeps more files
        await run_to_end(ctl, task("node", "sh", "-c", LINES))
        assert len(list((data_dir / "tasks" / "node").glob("stdout.log*"))) == 5
    finally:
        await ctl.close()


@pytest.mark.netns
def test_a_services_log_options_reach_its_tasks_files(lab_factory: Callable[..., Lab]) -> None:
    """`service create --log-opt max-size=8k --log-opt max-file=2` through the CLI, the
    leader and the worker to the task's shim: two files per stream within 8 KiB, and
    `service logs` still reads the newest lines."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    h1.cli("service", "create", "--name", "chatty", "--log-driver", "json-file", "--log-opt",
           "max-size=8k", "--log-opt", "max-file=2", "--restart-condition", "none", "--",
           "sh", "-c", LINES + "; echo all-done; sleep 100000")

    def done() -> str | None:
        out = h1.cli("service", "logs", "chatty").stdout
        return out if "all-done" in out else None

    out = wait_until(done, timeout=60, what="the task's output")
    assert "line-640-" in out and "line-1-" not in out, out[:200]
    (t,) = h1.cli_json("service", "ps", "chatty")
    files = sorted((h1.data_dir / "tasks" / t["id"]).glob("stdout.log*"))
    assert [p.name for p in files] == ["stdout.log", "stdout.log.1"]
    assert all(p.stat().st_size <= 8192 for p in files)
    tail = h1.cli("service", "logs", "--tail", "2", "chatty").stdout
    assert "line-640-" in tail and "all-done" in tail, tail
