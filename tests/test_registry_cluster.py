"""Services from a real registry on netns hosts (issue 13, registry must-shows): a registry
(Debian's docker-registry, TLS from a test CA, htpasswd Basic auth) on lab host h6, a cluster
of h1 (manager) + h2..h5 (workers).

* `service create` of REGISTRY:5000/team/app:1 with --with-registry-auth: the manager pins
  the tag to its digest, every node runs the same image, and the registry's access log shows
  each layer fetched once (the other nodes got it from a peer);
* `stack deploy --with-registry-auth` gives a stack's services the credentials too;
* moving the tag changes no running task until `service update --image`;
* wrong credentials, no credentials, an unknown tag, an unreachable registry and a tampered
  blob each show as a clear error in `service ps`, with nothing half-written in any image
  store."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import registryd

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

USER, PASSWORD = "alice", "s3cret"
NODES = 5  # agents (1 manager + workers); one more lab host runs the registry


def tasks(h: Host, svc: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = h.cli_json("service", "ps", svc)
    return out


def running(h: Host, svc: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        r = [t for t in tasks(h, svc) if t["state"] == "running"
             and t["desired_state"] == "running"]
        return r if len(r) == n else None
    return wait_until(check, timeout=timeout, interval=0.3, what=f"{n} running {svc}")


def task_error(h: Host, svc: str, needle: str, timeout: float = 40) -> str:
    """The message of a task of ``svc`` that contains ``needle`` (as `service ps` shows it)."""
    def check() -> str | None:
        for t in tasks(h, svc):
            text = t["error"] or t["message"]
            if needle in text:
                return str(text)
        return None
    return wait_until(check, timeout=timeout, interval=0.3, what=f"{svc}: {needle!r}")


def image_tags(h: Host) -> dict[str, str]:
    return {tag: img["id"] for img in h.cli_json("image", "ls") for tag in img["tags"]}


def store_tmp(h: Host) -> list[str]:
    tmp = h.data_dir / "images" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def login(h: Host, server: str, password: str, check: bool = True) -> Any:
    shoal = " ".join(h.shoal_argv)
    return h.run("sh", "-c", f"printf %s '{password}' | {shoal} -H unix://{h.sock} registry "
                 f"login -u {USER} --password-stdin {server}", check=check)


def test_services_from_a_registry(lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(NODES + 1)
    rh = lab.hosts[NODES]
    reg = registryd.Registry(tmp_path / "reg", rh.ip, 5000, users={USER: PASSWORD},
                             spawn=rh.spawn, netns=rh.netns)
    try:
        run_scenario(lab, reg, tmp_path)
    finally:
        reg.close()


def run_scenario(lab: Lab, reg: registryd.Registry, tmp_path: Path) -> None:
    nodes = lab.hosts[:NODES]
    h1, h2 = nodes[:2]
    for h in nodes:
        h.start_agent("--registry-ca", str(reg.ca))
    lab.form_cluster(managers=1, workers=NODES - 1, timeout=120)
    reg.wait_ready()
    layout = tmp_path / "layout"
    v1 = registryd.build_layout(layout, "1", marker="one", extra_mib=8)
    reg.push(layout, "1", "team/app:1")
    image = f"{reg.addr}/team/app:1"

    # ---- login: wrong credentials are refused at once; right ones are kept, never shown
    bad = login(h1, reg.addr, "wrong", check=False)
    assert bad.returncode != 0 and "refused the credentials" in bad.stderr
    login(h1, reg.addr, PASSWORD)
    secrets = h1.cli_json("secret", "ls")
    assert [s["name"] for s in secrets] == [f"registry-auth.{reg.host}-5000"]
    assert PASSWORD not in json.dumps(h1.cli_json("secret", "inspect", secrets[0]["name"]))
    assert PASSWORD not in "".join(h.agent_log.read_text() for h in nodes)

    # ---- create: pinned to the digest, the same image on every node, layers fetched once
    h1.cli("service", "create", "--name", "app", "--replicas", str(NODES), "--with-registry-auth",
           "--update-parallelism", "0", "--image", image)  # (updates: all tasks at once)
    ts = running(h1, "app", NODES, timeout=120)
    assert len({t["node"] for t in ts}) == NODES
    spec_image = h1.cli_json("service", "inspect", "app")[0]["spec"]["task"]["container"][
        "image"]
    assert spec_image == f"{image}@{v1['manifest']}"  # `service inspect` shows tag and digest
    pinned = f"{reg.addr}/team/app@{v1['manifest']}"
    ids = {h.name: image_tags(h).get(pinned) for h in nodes}
    assert None not in ids.values() and len(set(ids.values())) == 1, ids
    wait_until(lambda: h1.cli("service", "logs", "app").stdout.count("started one") == NODES
               or None, timeout=20, what=f"{NODES} tasks started from image one")
    layers = json.loads(reg.blob_path(v1["manifest"]).read_text())["layers"]
    gets = {layer["digest"][:19]: reg.blob_gets(layer["digest"]) for layer in layers}
    assert all(n == 1 for n in gets.values()), f"layer GETs from the registry: {gets}"

    # ---- a stack's services get the credentials too (docker's stack deploy
    # --with-registry-auth); without it the same file's task is refused them
    # (images no node holds yet: a node that has the bytes needs no registry)
    for tag in ("1", "2"):
        registryd.build_layout(layout, f"s{tag}", marker=f"stack{tag}")
        reg.push(layout, f"s{tag}", f"team/stack:{tag}")
    compose = tmp_path / "stack.yml"
    compose.write_text(f"services:\n  app:\n    image: {reg.addr}/team/stack:1\n")
    h1.cli("stack", "deploy", "--with-registry-auth", "-c", str(compose), "st")
    assert running(h1, "st_app", 1)[0]["state"] == "running"
    compose.write_text(f"services:\n  app:\n    image: {reg.addr}/team/stack:2\n")
    h1.cli("stack", "deploy", "-c", str(compose), "nocreds")
    assert "registry auth" in task_error(h1, "nocreds_app", "wants credentials")
    for stack in ("st", "nocreds"):
        h1.cli("stack", "rm", stack)

    # ---- moving the tag changes nothing running; `service update --image` rolls it out
    before = {t["id"] for t in running(h1, "app", NODES)}
    v2 = registryd.build_layout(layout, "2", marker="two")
    reg.push(layout, "2", "team/app:1")
    time.sleep(2)
    assert {t["id"] for t in running(h1, "app", NODES)} == before
    # a template change replaces every task, and the new ones still run the pinned bytes
    h1.cli("service", "update", "--env-add", "X=1", "app")
    spec_image = h1.cli_json("service", "inspect", "app")[0]["spec"]["task"]["container"][
        "image"]
    assert spec_image.endswith(v1["manifest"])
    wait_until(lambda: not before & {t["id"] for t in running(h1, "app", NODES)} or None,
               timeout=90, what="the --env-add rollout replaced every task")
    assert "started two" not in h1.cli("service", "logs", "app").stdout
    h1.cli("service", "update", "--image", image, "app")
    spec_image = h1.cli_json("service", "inspect", "app")[0]["spec"]["task"]["container"][
        "image"]
    assert spec_image == f"{image}@{v2['manifest']}"
    wait_until(lambda: h1.cli("service", "logs", "app").stdout.count("started two") == NODES
               or None, timeout=90, what=f"{NODES} tasks started from image two")

    # ---- `image pull`: on a manager with the cluster's credentials; a worker has none
    reg.push(layout, "2", "team/app:2")
    assert "Pulled" in h1.cli("image", "pull", f"{reg.addr}/team/app:2").stdout
    assert f"{reg.addr}/team/app:2" in image_tags(h1)
    denied = h2.cli("image", "pull", f"{reg.addr}/team/app:2", check=False)
    assert denied.returncode != 0 and "wants credentials" in denied.stderr

    # ---- `image tag` + `image push` (docker's): h1's image goes to another repository with
    # the cluster's credentials, and a worker runs a service from there; pushed once, the
    # blobs are there; a bare name is refused, and a worker (no credentials) is told why
    copy = f"{reg.addr}/team/copy:1"
    h1.cli("image", "tag", f"{reg.addr}/team/app:2", copy)
    out = h1.cli("image", "push", copy).stdout
    assert f"The push refers to repository [{reg.addr}/team/copy]" in out, out
    layers = len(json.loads(reg.blob_path(v2["manifest"]).read_text())["layers"])
    assert out.count(": Pushed") == layers + 1 and "1: digest: sha256:" in out, out
    (seen,) = h1.cli_json("image", "inspect", copy)  # (docker's image inspect)
    assert copy in seen["tags"] and len(seen["layers"]) == layers, seen
    assert "MARKER=two" in seen["config"]["Env"], seen
    assert h1.cli("image", "inspect", "--format", "{{.Config.WorkingDir}}", copy
                  ).stdout == "/etc\n"
    missing = h1.cli("image", "inspect", f"{reg.addr}/team/nope:1", check=False)
    assert missing.returncode != 0 and "no image" in missing.stderr, missing
    again = h1.cli("image", "push", copy).stdout
    assert ": Pushed" not in again and again.splitlines()[-1] == out.splitlines()[-1], again
    pushed = out.split("digest: ")[1].split()[0]
    assert reg.blob_path(pushed).exists()  # (the registry's own storage has the manifest)
    bare = h1.cli("image", "push", f"{reg.addr}/team/app:2".split("/", 1)[1], check=False)
    assert bare.returncode != 0 and "names its registry" in bare.stderr, bare
    h2.cli("image", "tag", f"{reg.addr}/team/app@{v2['manifest']}", copy)
    denied = h2.cli("image", "push", copy, check=False)
    assert denied.returncode != 0 and "push from a manager" in denied.stderr, denied
    h1.cli("service", "create", "--name", "copied", "--with-registry-auth", "--constraint",
           "node.hostname==h2", "--image", copy)
    running(h1, "copied", 1, timeout=90)
    assert h1.cli_json("service", "inspect", "copied")[0]["spec"]["task"]["container"][
        "image"] == f"{copy}@{pushed}"
    h1.cli("service", "rm", "copied")

    # ---- pull progress in the task's status message while the node pulls (issue 13): the
    # registry is paused (SIGSTOP) so the pull cannot finish before `service ps` shows it
    registryd.build_layout(layout, "4", marker="four", extra_mib=2)
    reg.push(layout, "4", "team/app:4")
    os.kill(reg.proc.pid, signal.SIGSTOP)
    try:
        h1.cli("service", "create", "--name", "prog", "--with-registry-auth",
               "--resolve-image", "never", "--image", f"{reg.addr}/team/app:4")
        assert task_error(h1, "prog", "pulling image").startswith("pulling image")
    finally:
        os.kill(reg.proc.pid, signal.SIGCONT)
    running(h1, "prog", 1, timeout=90)
    h1.cli("service", "rm", "prog")

    # ---- `image prune -a` on a worker: the unused image one goes, the running two stays
    def pinned_ids(h: Host) -> set[str]:
        return {i for t, i in image_tags(h).items() if "@sha256:" in t}

    h2_before = pinned_ids(h2)
    out = h2.cli("image", "prune", "-a").stdout
    assert "Total reclaimed space" in out
    tags = image_tags(h2)
    assert pinned not in tags and f"{reg.addr}/team/app@{v2['manifest']}" in tags, tags
    assert pinned_ids(h2) < h2_before
    assert store_tmp(h2) == []

    # ---- errors, each clear in `service ps`
    v3 = registryd.build_layout(layout, "3", marker="three", extra_mib=1)
    reg.push(layout, "3", "team/app:3")
    h1.cli("service", "create", "--name", "anon",  # no --with-registry-auth
           "--image", f"{reg.addr}/team/app:3")
    assert "registry auth" in task_error(h1, "anon", "wants credentials")
    h1.cli("service", "create", "--name", "nosuch", "--with-registry-auth",
           "--image", f"{reg.addr}/team/app:nope")
    assert task_error(h1, "nosuch", "not found").startswith("image not found")
    h1.cli("service", "create", "--name", "unreach", "--image", f"{reg.host}:5999/team/app:1")
    assert task_error(h1, "unreach", "registry unreachable")
    # a tampered blob: refused by digest, nothing of it kept
    big = json.loads(reg.blob_path(v3["manifest"]).read_text())["layers"][-1]["digest"]
    blob = reg.blob_path(big)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    h1.cli("service", "create", "--name", "tampered", "--with-registry-auth",
           "--image", f"{reg.addr}/team/app:3")
    assert "digest mismatch" in task_error(h1, "tampered", "digest mismatch")
    # wrong stored credentials (written as the secret login would keep, bypassing its check)
    h1.cli("registry", "logout", reg.addr)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"username": USER, "password": "nope"}))
    h1.cli("secret", "create", f"registry-auth.{reg.host}-5000", str(wrong))
    h1.cli("service", "create", "--name", "badcreds", "--with-registry-auth",
           "--image", f"{reg.addr}/team/app:3")
    assert "refused the credentials" in task_error(h1, "badcreds", "refused the credentials")
    for svc in ("anon", "nosuch", "unreach", "tampered", "badcreds"):
        h1.cli("service", "rm", svc)
    for h in nodes:
        tags = image_tags(h)
        assert not [t for t in tags if "app:3" in t or "app:nope" in t], tags
        assert store_tmp(h) == [], f"{h.name}: half-written files in the image store"
        assert not (h.data_dir / "images" / "blobs" / "sha256" / big[7:]).exists()
