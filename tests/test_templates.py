"""Docker's placeholders in a task template (shoal.raft.templates): the syntax, the spec's
host name check, and the API's check of env values and mounts."""

from __future__ import annotations

import pytest

from shoal.raft import templates
from shoal.raft.errors import ValidationError
from shoal.raft.validate import validate_spec

VALUES = {".Service.ID": "s1", ".Service.Name": "web", ".Node.ID": "n1",
          ".Node.Hostname": "node-a", ".Node.Platform.OS": "linux",
          ".Node.Platform.Architecture": "x86_64", ".Task.ID": "t1", ".Task.Name": "web.2",
          ".Task.Slot": "2"}


@pytest.mark.parametrize(("text", "out"), [
    ("{{.Node.Hostname}}-{{.Service.Name}}", "node-a-web"),
    ("{{ .Task.Slot }}", "2"),
    ("/data/{{.Task.Name}}", "/data/web.2"),
    ('{{index .Service.Labels "env"}}-{{index .Service.Labels "none"}}', "prod-"),
    ("no placeholder", "no placeholder"),
    ("{{.Node.Platform.OS}}/{{.Node.Platform.Architecture}}", "linux/x86_64"),
])
def test_placeholders_are_filled_in(text: str, out: str) -> None:
    templates.check(text)
    assert templates.expand(text, VALUES, {"env": "prod"}) == out


@pytest.mark.parametrize("text", ["{{.Node.Bogus}}", "{{printf \"%d\" 1}}", "{{.Task.Slot",
                                  "{{}}", "{{index .Node.Labels \"x\"}}"])
def test_unknown_placeholders_and_go_syntax_beyond_them_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        templates.check(text)


def test_a_host_name_may_hold_placeholders_but_not_unknown_ones() -> None:
    spec = {"name": "web", "task": {"container": {"command": ["x"],
                                                  "hostname": "{{.Node.Hostname}}-web"}}}
    assert validate_spec(spec).task.container.hostname == "{{.Node.Hostname}}-web"
    for bad in ("{{.Node.Bogus}}", "a{b", "bad name"):
        spec["task"]["container"]["hostname"] = bad  # type: ignore[index]
        with pytest.raises(ValidationError) as exc:
            validate_spec(spec)
        assert exc.value.field == "task.container.hostname"
