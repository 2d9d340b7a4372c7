"""Issue 17 must-show 4 on netns hosts through the real CLI: a 5-instruction Dockerfile
built by `shoal image build` (the context streamed to h1's agent as a tar, the build output
streamed back), run as a 3-replica service across 3 nodes (h2 and h3 fetch the built image
from h1, blob by blob, like any other), and a rebuild with no change made entirely from the
cache (no new layer, no new image); `image save` there and `image load` on another node give
the same image; a multi-stage Dockerfile built up to its ``--target``. Timings:
bench/image_build.py, not here."""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_runtime_images import busybox_rootfs

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """h1 manager, h2 and h3 workers; h4 runs no agent (a machine outside the cluster)."""
    lab = Lab(4)
    try:
        lab.form_cluster(managers=1, workers=2)
        yield lab
    finally:
        left = lab.close()
        assert not left, f"lab teardown left things behind: {left}"

DOCKERFILE = """\
FROM busybox:1
RUN mkdir -p /app && echo "built by shoal" > /app/built.txt
COPY hello.txt /app/
ENV GREETING="hello from"
CMD ["/bin/sh", "-c", "echo $GREETING $(hostname): $(cat /app/built.txt /app/hello.txt); \\
     while true; do sleep 1; done"]
"""


def test_built_image_runs_as_a_3_replica_service_and_rebuilds_from_cache(
        lab: Lab, tmp_path: Path) -> None:
    h1 = lab.hosts[0]
    h1.cli("image", "import", "busybox:1", str(busybox_rootfs(tmp_path / "bb")))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "hello.txt").write_text("the context\n")
    (ctx / "big.bin").write_bytes(b"x" * 4096)
    (ctx / ".dockerignore").write_text("*.bin\n")

    out = h1.cli("image", "build", "-t", "web:1", str(ctx), timeout=120).stdout
    assert "Step 5/5 : CMD" in out and "Successfully tagged web:1" in out, out
    assert "0/5 steps from the cache, 2 new layers" in out, out
    layers = sorted(p.name for p in (h1.data_dir / "images" / "layers").iterdir())

    again = h1.cli_json("image", "build", "-t", "web:1", str(ctx), timeout=120)
    assert (again["cached"], again["layers_created"], again["images_created"]) == (4, 0, 0)
    assert sorted(p.name for p in (h1.data_dir / "images" / "layers").iterdir()) == layers
    built = {tag: img["id"] for img in h1.cli_json("image", "ls") for tag in img["tags"]}
    assert built["web:1"] == again["image"]

    # multi-stage, `--target`: up to that stage, the one after it not built
    (ctx / "Multi").write_text("FROM busybox:1 AS build\nCOPY hello.txt /src/\n"
                               "FROM busybox:1 AS debug\nCOPY --from=build /src /dbg\n"
                               "FROM scratch\nCOPY --from=0 /src/hello.txt /\n")
    ms = h1.cli_json("image", "build", "-f", str(ctx / "Multi"), "--target", "Debug", "-t",
                     "web:debug", str(ctx), timeout=120)
    assert (ms["steps"], ms["layers_created"], ms["tags"]) == (4, 2, ["web:debug"]), ms
    bad = h1.cli("image", "build", "-f", str(ctx / "Multi"), "--target", "prod", str(ctx),
                 check=False)
    assert bad.returncode != 0 and "target stage 'prod' is not in the Dockerfile (its " \
        "stages: build, debug)" in bad.stderr, bad.stderr

    # a bad Dockerfile: a clear error with its line, exit status non-zero
    (ctx / "Bad").write_text("FROM busybox:1\nONBUILD RUN true\n")
    bad = h1.cli("image", "build", "-f", str(ctx / "Bad"), str(ctx), check=False)
    assert bad.returncode != 0 and "line 2: unsupported instruction 'ONBUILD'" in bad.stderr

    # `image save` (docker's) on h1, `image load` on h2: the same image, no registry; to
    # stdout as well; an image h1 lacks is an error and leaves no file
    saved, piped = tmp_path / "web.tar", tmp_path / "piped.tar"
    h1.cli("image", "save", "-o", str(saved), "web:1")
    h1.run("sh", "-c", f"{shlex.join([*h1.shoal_argv, '-H', f'unix://{h1.sock}'])} image "
           f"save web:1 > {piped}")
    assert piped.read_bytes() == saved.read_bytes()
    assert "Loaded image web:1" in lab.hosts[1].cli("image", "load", str(saved)).stdout
    ids = {tag: img["id"] for img in lab.hosts[1].cli_json("image", "ls") for tag in img["tags"]}
    assert ids["web:1"] == again["image"], ids
    gone = h1.cli("image", "save", "-o", str(tmp_path / "gone.tar"), "nope:1", check=False)
    assert gone.returncode != 0 and "nope:1" in gone.stderr, gone.stderr
    assert not list(tmp_path.glob("gone.tar*"))

    h1.cli("service", "create", "--name", "web", "--replicas", "3", "--image", "web:1")

    def three() -> list[dict[str, object]] | None:
        ts = [t for t in h1.cli_json("service", "ps", "web") if t["state"] == "running"]
        return ts if len(ts) == 3 else None
    ts = wait_until(three, timeout=90, interval=0.3, what="3 running web tasks")
    assert len({t["node"] for t in ts}) == 3
    for h in lab.hosts[1:3]:  # fetched from h1: the same image id
        ids = {tag: img["id"] for img in h.cli_json("image", "ls") for tag in img["tags"]}
        assert ids.get("web:1") == again["image"], (h.name, ids)
    logs = wait_until(lambda: ((o := h1.cli("service", "logs", "web").stdout)
                      .count("built by shoal the context") >= 3 and o) or None,
                      timeout=30, what="3 greetings")
    assert logs.count("hello from web-") == 3, logs


NET_DOCKERFILE = """\
FROM busybox:1
ARG TRY=1
RUN busybox wget -q -O /fetched.txt http://{server}/payload.txt \\
    && busybox ip -o -4 addr > /addrs.txt && cat /etc/resolv.conf > /resolv.txt \\
    && busybox nslookup names > /names.txt
"""


def test_run_steps_get_a_network_as_dockers_builder_gives(lab: Lab, tmp_path: Path) -> None:
    """`image build --network`: by default a RUN is on the node's task network — an address
    of its own, outbound NAT (h4, the HTTP server, has no route back to h1's task subnet:
    its answer comes back only if the request was masqueraded), the node's DNS server in its
    resolv.conf (it resolves a service name) — and everything is released after it, also
    when the RUN fails or the build is cancelled; `none` has only lo (the fetch fails);
    `host` is h1's own namespace."""
    h1, h4 = lab.hosts[0], lab.hosts[3]  # (h4 runs no agent)
    served = tmp_path / "served"
    served.mkdir()
    (served / "payload.txt").write_text("fetched over the network\n")
    h4.spawn("python3", "-m", "http.server", "8099", "--bind", h4.ip, cwd=served,
             log_name="http")
    wait_until(lambda: "Serving HTTP" in (h4.data_dir / "http.log").read_text(),
               what="the HTTP server on h4")
    h1.cli("image", "import", "busybox:1", str(busybox_rootfs(tmp_path / "bb")))
    # a service name the node's DNS answers (with its VIP, no task needed)
    h1.cli("service", "create", "--name", "names", "--replicas", "0", "-p", "8080:80",
           "--image", "busybox:1", "--", "sleep", "1000")
    vip = wait_until(lambda: h1.cli_json("service", "inspect", "names")[0].get("vip"),
                     what="the service's VIP")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(NET_DOCKERFILE.format(server=f"{h4.ip}:8099"))
    bridge = h1.run("ip", "-o", "-4", "addr", "show", "shoal0").stdout.split()[3]
    gateway, subnet = bridge.split("/")[0], ipaddress.ip_interface(bridge).network

    def released() -> bool:  # no build step holds an address, a veth or a task
        state = h1.data_dir / "network.json"  # (written at the first attach)
        addrs = json.loads(state.read_text())["addrs"] if state.exists() else {}
        links = h1.run("ip", "-o", "link").stdout
        return not [t for t in addrs if t.startswith("build")] and "svbuild" not in links \
            and not list((h1.data_dir / "tasks").glob("build*"))

    def layer_file(image: str, name: str) -> str:
        layers = h1.cli_json("image", "inspect", image)[0]["layers"]
        top = h1.data_dir / "images" / "layers" / layers[-1].removeprefix("sha256:")
        return (top / name).read_text()

    h1.cli("image", "build", "-t", "net:default", str(ctx), timeout=120)
    assert layer_file("net:default", "fetched.txt") == "fetched over the network\n"
    own = layer_file("net:default", "addrs.txt")  # its own address, in h1's task subnet
    addr = own.split("eth0")[1].split()[1].split("/")[0]
    assert ipaddress.ip_address(addr) in subnet and addr != gateway, own
    assert f"nameserver {gateway}" in layer_file("net:default", "resolv.txt")
    assert vip in layer_file("net:default", "names.txt")
    assert released()

    # none: only lo, the fetch fails and the build with it
    bad = h1.cli("image", "build", "--network", "none", "--build-arg", "TRY=2", str(ctx),
                 check=False, timeout=120)
    assert bad.returncode != 0 and "line 3: RUN" in bad.stderr, bad
    assert "non-zero code" in bad.stderr and released()

    # host: h1's own namespace (its lab address), the server reached directly
    h1.cli("image", "build", "--network", "host", "-t", "net:host", "--build-arg", "TRY=3",
           str(ctx), timeout=120)
    assert layer_file("net:host", "fetched.txt") == "fetched over the network\n"
    assert f" {h1.ip}/" in layer_file("net:host", "addrs.txt")
    assert vip in layer_file("net:host", "names.txt")  # (the node's DNS server here too)

    # a RUN that fails after it was given its address: released
    (ctx / "Dockerfile").write_text("FROM busybox:1\nRUN busybox ip -o -4 addr; exit 3\n")
    failed = h1.cli("image", "build", str(ctx), check=False, timeout=120)
    assert failed.returncode != 0 and "non-zero code: 3" in failed.stderr, failed
    assert " eth0 " in failed.stdout and released(), failed.stdout

    # a build whose client goes away mid-RUN: cancelled, and released
    (ctx / "Dockerfile").write_text(
        "FROM busybox:1\nRUN while true; do echo tick; sleep 0.2; done\n")
    client = h1.spawn(*h1.shoal_argv, "-H", f"unix://{h1.sock}", "image", "build",
                      str(ctx), log_name="cancelled")
    wait_until(lambda: not released(), what="the RUN attached")
    client.kill()
    client.wait()
    wait_until(released, timeout=20, what="the cancelled RUN's address released")


def _build_runs(h1_data: Path, links: str) -> list[str]:
    """What build steps hold on h1: addresses (network.json), veths, task directories."""
    state = h1_data / "network.json"
    addrs = json.loads(state.read_text())["addrs"] if state.exists() else {}
    return [*(f"address {a} of {t}" for t, a in addrs.items() if t.startswith("build")),
            *(f"veth {w}" for w in links.split() if w.startswith("svbuild")),
            *(f"task {p.name}" for p in (h1_data / "tasks").glob("build*"))]


def _silent_build(lab: Lab, tmp_path: Path, log_name: str
                  ) -> tuple[Any, Callable[[], list[str]]]:
    """A build on h1 whose RUN sleeps silently, its client spawned, once the RUN attached:
    (the client, what of the RUN h1 holds)."""
    h1 = lab.hosts[0]
    h1.cli("image", "import", "busybox:1", str(busybox_rootfs(tmp_path / "bb")))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM busybox:1\nRUN sleep 1000\n")

    def held() -> list[str]:
        return _build_runs(h1.data_dir, h1.run("ip", "-o", "link").stdout)

    client = h1.spawn(*h1.shoal_argv, "-H", f"unix://{h1.sock}", "image", "build",
                      str(ctx), log_name=log_name)
    try:
        wait_until(lambda: len(held()) == 3 and held(), timeout=60, what="the RUN attached")
    except BaseException:
        client.kill()
        client.wait()
        raise
    return client, held


def test_a_run_an_agent_restart_cut_short_goes_with_its_address(lab: Lab,
                                                                 tmp_path: Path) -> None:
    """The agent killed mid-RUN (SIGKILL: the RUN's shim and its namespace survive it): the
    restarted agent removes that RUN and releases its address and veth at once — no build
    can still wait for it — rather than leaving a silent RUN running on the task network,
    holding its address, until some later build happens to sweep it."""
    h1 = lab.hosts[0]
    client, held = _silent_build(lab, tmp_path, "cut-short")
    try:
        h1.restart_agent()
    finally:
        client.kill()
        client.wait()
    wait_until(lambda: h1.cli_json("node", "ls") and True, timeout=30,
               what="h1's agent back")
    wait_until(lambda: not held(), timeout=20, what="the cut-short RUN removed and released")
    # ... and what the build had in DATA_DIR/build/tmp (its context) went as the agent started
    assert list((h1.data_dir / "build" / "tmp").iterdir()) == []


def test_a_build_whose_client_goes_away_during_a_silent_run_is_cancelled(
        lab: Lab, tmp_path: Path) -> None:
    """The client of a build goes away (Ctrl-C) while a RUN prints nothing (a `sleep`, an
    `apt-get` waiting on a slow mirror): the agent notices without having to write to it,
    cancels the build and releases the RUN — its task, address and veth — in seconds, not
    when the RUN ends on its own (here 1000 s; at worst the builder's one-hour limit)."""
    client, held = _silent_build(lab, tmp_path, "silent")
    client.kill()
    client.wait()
    wait_until(lambda: not held(), timeout=15, what="the silent RUN cancelled and released")


SECRET_DOCKERFILE = """\
FROM busybox:1
RUN --mount=type=secret,id=npmrc cat /run/secrets/npmrc > /dev/null \\
    && test -s /run/secrets/npmrc && sha256sum /run/secrets/npmrc | cut -d' ' -f1 > /h1
RUN --mount=type=secret,id=tok,env=TOK printf %s "$TOK" | sha256sum | cut -d' ' -f1 > /h2
"""


def test_build_secrets_go_in_the_request_and_are_left_nowhere(lab: Lab,
                                                              tmp_path: Path) -> None:
    """`image build --secret id=npmrc,src=FILE --secret id=tok,env=TOK` through the agent's
    API: the RUNs saw the right bytes (their hashes are in the image), and nothing of the
    node's data directory (layers, blobs, configs, the step cache, task directories, the
    agent's log) nor the build's output holds them; a bad --secret is refused naming it."""
    import hashlib

    h1 = lab.hosts[0]
    if "busybox:1" not in {t for i in h1.cli_json("image", "ls") for t in i["tags"]}:
        h1.cli("image", "import", "busybox:1", str(busybox_rootfs(tmp_path / "bb")))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(SECRET_DOCKERFILE)
    npmrc, tok = b"//registry/:_authToken=npm-5ec4e7\n", "ghp-0a1b2c3d4e5f"
    (tmp_path / "npmrc").write_bytes(npmrc)
    res = h1.run("env", f"TOK={tok}", *h1.shoal_argv, "-H", f"unix://{h1.sock}", "image",
                 "build", "-t", "sec:1", "--secret", f"id=npmrc,src={tmp_path / 'npmrc'}",
                 "--secret", "id=tok,env=TOK", str(ctx), timeout=120)
    assert "0/3 steps from the cache" in res.stdout, res.stdout
    h1.cli("service", "create", "--name", "sec", "--image", "sec:1", "--", "sh", "-c",
           "cat /h1 /h2; sleep 1000")
    want = [hashlib.sha256(npmrc).hexdigest(), hashlib.sha256(tok.encode()).hexdigest()]
    wait_until(lambda: all(w in h1.cli("service", "logs", "sec").stdout for w in want),
               timeout=60, what="the hashes of the secrets")
    h1.cli("service", "rm", "sec")
    for needle in (b"npm-5ec4e7", tok.encode()):
        assert needle.decode() not in res.stdout + res.stderr
        hits = [str(p) for p in h1.data_dir.rglob("*") if p.is_file() and not p.is_symlink()
                and not p.is_socket() and needle in p.read_bytes()]
        assert hits == [], hits
    bad = h1.cli("image", "build", "--secret", "id=x,env=SHOAL_NOT_SET_ANYWHERE", str(ctx),
                 check=False)
    assert bad.returncode != 0 and "SHOAL_NOT_SET_ANYWHERE is not set" in bad.stderr
    # the agent refuses a bad secrets part naming the field, and keeps answering
    import subprocess

    for header, body, words in (("x1", b"", "X-Shoal-Build-Secrets must be"),
                                ("10", b'{"a":"!!"}', "secret a: its value is not base64"),
                                ("20", b"{}", "the body ended inside its secrets part")):
        out = subprocess.run(["curl", "-s", "--unix-socket", str(h1.sock), "-H",
                              f"X-Shoal-Build-Secrets: {header}", "--data-binary", "@-",
                              "http://agent/v1/images/build"], input=body,
                             capture_output=True, timeout=30, check=True).stdout
        err = json.loads(out)["error"]
        assert err["field"] == "secret" and words in err["message"], err
    assert h1.cli_json("image", "ls")
