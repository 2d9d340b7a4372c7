"""A task's own DNS settings end to end (Docker's --dns, --dns-search, --dns-option): a real
agent in a lab host, services made through the CLI, what the task sees read from its output
(`service logs`). The task's own resolver is a small DNS server in the lab host's netns."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# A resolver that knows one name (argv[2] → argv[3]) and no other (NXDOMAIN), on UDP
# argv[1]:53: the "corporate" DNS server a task names with --dns.
RESOLVER = r"""
import socket, sys
import dns.exception, dns.message, dns.rcode, dns.rdatatype, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    try:
        q = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError):  # (not a query: ignored)
        continue
    r = dns.message.make_response(q)
    name, kind = q.question[0].name, q.question[0].rdtype
    if name.to_text().rstrip(".").lower() == sys.argv[2] and kind == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(name, 5, "IN", "A", sys.argv[3]))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    s.sendto(r.to_wire(), addr)
"""
NAME, ADDR = "probe.corp.test", "203.0.113.77"
# Runs as a task: resolves argv[1] again and again, one "RESULT <address|unknown>" line each.
PROBE = r"""
import socket, sys, time
while True:
    try:
        print("RESULT", socket.gethostbyname(sys.argv[1]), flush=True)
    except OSError:
        print("RESULT unknown", flush=True)
    time.sleep(0.5)
"""


def logs(h: Host, svc: str) -> str:
    return h.cli("service", "logs", svc).stdout


def logs_with(h: Host, svc: str, needle: str, count: int = 1) -> str | None:
    out = logs(h, svc)
    return out if out.count(needle) >= count else None


def test_a_tasks_search_domains_and_options_reach_its_resolv_conf(
        lab_factory: Callable[..., Lab]) -> None:
    """--dns-search and --dns-option through the CLI, the leader and the worker to the task's
    /etc/resolv.conf: the node's DNS server stays its nameserver, shoal's domain first, the
    user's ndots instead of shoal's; a task on the host's network with --dns names that
    server itself (Docker's); a task without settings keeps shoal's file."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    show = "cat /etc/resolv.conf; echo conf-done; sleep 100000"
    h1.cli("service", "create", "--name", "tuned", "--dns-search", "corp.example",
           "--dns-option", "ndots:3", "--dns-option", "timeout:1", "--", "sh", "-c", show)
    h1.cli("service", "create", "--name", "hosty", "--network", "host", "--dns", h1.ip,
           "--dns-search", "corp.example", "--", "sh", "-c", show)
    h1.cli("service", "create", "--name", "plain", "--", "sh", "-c", show)
    out = wait_until(lambda: logs_with(h1, "tuned", "conf-done"), timeout=60,
                     what="tuned's resolv.conf")
    lines = [line.split("|", 1)[-1].strip() for line in out.splitlines()]
    assert "search shoal corp.example" in lines, out
    assert "options ndots:3 timeout:1" in lines and "ndots:1" not in out, out
    gateway = next(line.split()[1] for line in lines if line.startswith("nameserver"))
    assert gateway.startswith("10.99."), out  # (the node's DNS server, on the task bridge)
    out = wait_until(lambda: logs_with(h1, "hosty", "conf-done"), timeout=60,
                     what="hosty's resolv.conf")
    lines = [line.split("|", 1)[-1].strip() for line in out.splitlines()]
    assert f"nameserver {h1.ip}" in lines and "search corp.example" in lines, out
    assert f"nameserver {gateway}" not in lines, out
    out = wait_until(lambda: logs_with(h1, "plain", "conf-done"), timeout=60,
                     what="plain's resolv.conf")
    lines = [line.split("|", 1)[-1].strip() for line in out.splitlines()]
    assert f"nameserver {gateway}" in lines and "options ndots:1" in lines, out
    assert "corp.example" not in out, out


def test_a_tasks_own_dns_server_answers_its_outside_names(lab_factory: Callable[..., Lab]
                                                         ) -> None:
    """--dns IP: the node's DNS server forwards the task's other names to that server (moby's
    embedded resolver does likewise), so the task gets its answer; a task without --dns asks
    through the node's own upstreams, which do not know the name. Service names still
    resolve for the task with --dns."""
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    h1.spawn(sys.executable, "-c", RESOLVER, h1.ip, NAME, ADDR, log_name="resolver")
    wait_until(lambda: "ready" in (h1.data_dir / "resolver.log").read_text(), timeout=20,
               what="the lab's resolver")
    h1.cli("service", "create", "--name", "corp", "--dns", h1.ip, "--", "python3", "-c",
           PROBE, NAME)
    h1.cli("service", "create", "--name", "plain", "--", "python3", "-c", PROBE, NAME)
    h1.cli("service", "create", "--name", "named", "--dns", h1.ip, "--", "python3", "-c",
           PROBE, "plain")
    out = wait_until(lambda: logs_with(h1, "corp", f"RESULT {ADDR}"), timeout=60,
                     what="corp's answer from its own server")
    out = wait_until(lambda: logs_with(h1, "plain", "RESULT ", count=2), timeout=60,
                     what="two answers of plain")
    assert f"RESULT {ADDR}" not in out and "RESULT unknown" in out, out
    out = wait_until(lambda: logs_with(h1, "named", "RESULT 10."), timeout=60,
                     what="a service name resolved by the task with --dns")
