"""`service inspect --pretty` and `node inspect --pretty` (shoal.cli.pretty): docker's layout
of what a person wants to read, fields left out when they are empty."""

from __future__ import annotations

from shoal.cli import pretty, specflags
from shoal.cli.main import build_parser
from shoal.raft.models import to_dict
from shoal.raft.validate import validate_spec


def _service(*flags: str) -> dict[str, object]:
    args = build_parser().parse_args(["service", "create", "--name", "web", *flags, "--",
                                      "sleep", "1000"])
    spec = to_dict(validate_spec(specflags.spec_from_create_args(args)))
    return {"id": "e40d99ce292f8c429451", "name": "web", "spec": spec, "vip": "10.98.0.1",
            "update_status": {"state": "", "message": "", "started_at": 0.0,
                              "completed_at": 0.0}}


def test_a_service_as_dockers_pretty_template_shows_it() -> None:
    text = pretty.service(_service(
        "--replicas", "2", "-p", "8080:80", "--label", "tier=front", "-e", "A=1", "--mount",
        "type=tmpfs,dst=/cache", "--limit-memory", "64M", "--reserve-cpu", "0.1",
        "--constraint", "node.role==manager", "--health-cmd", "true", "--cap-add",
        "NET_ADMIN", "--ulimit", "nofile=1024:2048", "--update-delay", "10s"))
    lines = text.splitlines()
    assert lines[:5] == ["ID:\t\te40d99ce292f8c429451", "Name:\t\tweb", "Labels:",
                         " tier=front", "Service Mode:\tReplicated"]
    for want in (" Replicas:\t2", " Constraints:\t[node.role==manager]", " Delay:\t\t10s",
                 " Update order:      stop-first", " Args:\t\tsleep 1000 ", " Env:\t\tA=1 ",
                 "Capabilities:", " Add: NET_ADMIN", " nofile: 1024:2048", " Target:\t/cache",
                 "  Type:\t\ttmpfs", "  Memory:\t64MiB", "  CPU:\t\t0.1",
                 "Endpoint Mode:\tvip", " PublishedPort = 8080", "  TargetPort = 80",
                 "\t Test = true"):
        assert want in lines, (want, text)
    plain = pretty.service(_service()).splitlines()  # (what is empty is left out)
    assert not {"Labels:", "Capabilities:", "Mounts:", "Resources:", "Ports:"} & set(plain)


def test_a_node_as_dockers_pretty_template_shows_it() -> None:
    rec = {"id": "a13269bdad032f9dbb8f", "hostname": "h1", "addr": "10.77.0.11",
           "role": "manager", "state": "ready", "availability": "active",
           "manager_status": "leader", "message": "", "tasks": 2, "version": "0.2.0",
           "labels": {"zone": "a"}, "raft_port": 2378, "created_at": 1796597127.48,
           "resources": {"memory_bytes": 25276194816, "cpus": 2.0,
                         "reserved_memory_bytes": 0, "reserved_cpus": 0.2}}
    lines = pretty.node(rec).splitlines()
    for want in ("ID:\t\t\ta13269bdad032f9dbb8f", " - zone=a", "Hostname:\t\th1",
                 " State:\t\t\tReady", " Availability:\t\tActive", "Manager Status:",
                 " Address:\t\t10.77.0.11:2378", " Leader:\t\tYes", " CPUs:\t\t\t2",
                 " Memory:\t\t23.54GiB", " Reserved CPUs:\t\t0.2", "Tasks:\t\t\t2"):
        assert want in lines, (want, lines)
    worker = pretty.node({**rec, "role": "worker", "manager_status": ""}).splitlines()
    assert "Manager Status:" not in worker


def test_generic_resources_in_both_pretty_views() -> None:
    """A service's generic reservations under Reservations; a node's generic resources with
    what its live tasks reserve of each kind."""
    lines = pretty.service(_service("--generic-resource", "gpu=2")).splitlines()
    assert " Reservations:" in lines and "  gpu:\t\t2" in lines
    rec = {"id": "a1", "hostname": "h1", "addr": "10.77.0.11", "role": "worker",
           "state": "ready", "availability": "active", "manager_status": "", "tasks": 1,
           "created_at": 1796597127.48,
           "resources": {"memory_bytes": 1 << 30, "cpus": 2.0,
                         "generic_resources": {"GPU": ["a", "b"], "ssd": 3},
                         "reserved_generic_resources": {"gpu": 1}}}
    lines = pretty.node(rec).splitlines()
    assert " GPU:\t\ta,b (reserved 1)" in lines and " ssd:\t\t3 (reserved 0)" in lines
