"""Compose files → service specs (shoal.cli.compose) and the deploy plan (shoal.cli.stack),
without a cluster: interpolation, both port syntaxes, env lists and maps, durations, errors that
name the path, warnings that name the key once; redeploys that change only what changed."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shoal.cli import compose
from shoal.cli.compose import STACK_LABEL, ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.cli.stack import plan_deploy
from shoal.raft.models import to_dict
from shoal.raft.spec import ServiceSpec


def write(tmp_path: Path, text: str, name: str = "compose.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def deploy(tmp_path: Path, text: str, env: dict[str, str] | None = None,
           stack: str = "app") -> compose.Stack:
    return load_stack(stack, [write(tmp_path, text)], env or {})


def svc(stack: compose.Stack, key: str) -> ServiceSpec:
    return next(s for s in stack.services if s.name == f"{stack.name}_{key}")


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ComposeError) as exc:
        deploy(tmp_path, text, env)
    return str(exc.value)


# ----------------------------------------------------------------------------- interpolation

def test_interpolation_defaults_errors_and_dollar_escapes(tmp_path: Path) -> None:
    env = {"TAG": "1.2", "EMPTY": "", "WHO": "world"}
    text = """
services:
  web:
    image: "busybox:${TAG}"
    command: ["echo", "$$HOME", "${EMPTY:-dflt}", "${EMPTY-kept}", "${NOPE:-${WHO}}",
              "${WHO:+alt}", "$WHO"]
"""
    s = svc(deploy(tmp_path, text, env), "web")
    assert s.task.container.image == "busybox:1.2"
    assert s.task.container.command == ("echo", "$HOME", "dflt", "", "world", "alt", "world")


def test_a_required_variable_names_its_path_and_message(tmp_path: Path) -> None:
    text = "services:\n  web:\n    image: ${IMG:?set IMG to the image}\n"
    assert error(tmp_path, text) == \
        "services.web.image: required variable IMG is missing a value: set IMG to the image"
    assert "required variable IMG is empty" in error(tmp_path, text, {"IMG": ""})


def test_an_unset_variable_is_empty_with_a_warning(tmp_path: Path) -> None:
    st = deploy(tmp_path, "services:\n  web:\n    command: echo x${NOPE}y\n")
    assert svc(st, "web").task.container.command == ("echo", "xy")
    assert any("NOPE variable is not set" in w and "services.web.command" in w
               for w in st.warnings)


def test_dotenv_beside_the_file_gives_variables_the_environment_overrides(
        tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# comment\nA=from-dotenv\nexport B='quoted # not a "
                                   "comment'\nC=plain # a comment\n")
    text = "services:\n  web:\n    command: [echo, '${A}', '${B}', '${C}']\n"
    assert svc(deploy(tmp_path, text), "web").task.container.command == \
        ("echo", "from-dotenv", "quoted # not a comment", "plain")
    assert svc(deploy(tmp_path, text, {"A": "from-env"}), "web").task.container.command[1] \
        == "from-env"


def test_bad_interpolation_is_refused_with_its_path(tmp_path: Path) -> None:
    assert error(tmp_path, "services:\n  web:\n    command: echo ${A\n").startswith(
        "services.web.command: ")


# ----------------------------------------------------------------------------- YAML

def test_yaml_1_2_scalars_a_port_mapping_is_not_a_base_60_number(tmp_path: Path) -> None:
    text = """
services:
  web:
    command: [sleep, "1"]
    ports:
      - 80:80
    environment:
      ANSWER: yes
      ON: true
"""
    s = svc(deploy(tmp_path, text), "web")
    assert [(p.published, p.target) for p in s.endpoint.ports] == [(80, 80)]
    assert s.task.container.env == {"ANSWER": "yes", "ON": "true"}


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    msg = error(tmp_path, "services:\n  web:\n    image: [unclosed\n")
    assert msg.startswith(str(tmp_path / "compose.yml")) and "line" in msg


# ----------------------------------------------------------------------------- keys

def test_ports_short_and_long_syntax(tmp_path: Path) -> None:
    text = """
services:
  web:
    command: [sleep, "1"]
    ports:
      - "8080:80"
      - "53:5353/udp"
      - "9000-9001:7000-7001"
      - target: 443
        published: 8443
      - target: 6000
        published: "6001"
        protocol: udp
        mode: host
      - "5000"
      - "7070/TCP"
      - target: 5001
"""
    st = deploy(tmp_path, text)
    ports = [(p.published, p.target, p.protocol) for p in svc(st, "web").endpoint.ports]
    # no published port: 0, the managers assign one of 30000-32767 (as `-p 5000`, Docker)
    assert ports == [(8080, 80, "tcp"), (53, 5353, "udp"), (9000, 7000, "tcp"),
                     (9001, 7001, "tcp"), (8443, 443, "tcp"),
                     (0, 5000, "tcp"), (0, 7070, "tcp"), (0, 5001, "tcp")]
    # mode: host is published in host mode (only where a task runs), not through the mesh
    host = [(p.published, p.target, p.protocol) for p in svc(st, "web").endpoint.host_ports]
    assert host == [(6001, 6000, "udp")]
    assert not any(w.startswith("ports.mode") for w in st.warnings)
    assert not any("no published port" in w for w in st.warnings)


def test_environment_as_list_and_map_over_env_files(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("A=file\nB=file\n")
    text = """
services:
  lst:
    command: [sleep, "1"]
    env_file: app.env
    environment: ["B=list", "FROM_SHELL", "UNSET_ONE", "EQ=a=b"]
  map:
    command: [sleep, "1"]
    env_file: [{path: app.env}, {path: missing.env, required: false}]
    environment: {B: map, N: 3, FROM_SHELL: null, NONE: null}
"""
    st = deploy(tmp_path, text, {"FROM_SHELL": "shell"})
    assert svc(st, "lst").task.container.env == {"A": "file", "B": "list", "FROM_SHELL": "shell",
                                                 "EQ": "a=b"}
    assert svc(st, "map").task.container.env == {"A": "file", "B": "map", "N": "3",
                                                 "FROM_SHELL": "shell"}


def test_deploy_healthcheck_and_durations(tmp_path: Path) -> None:
    text = """
services:
  web:
    command: python3 -m http.server 8000
    user: "1000:1000"
    working_dir: /tmp
    hostname: front
    stop_signal: INT
    stop_grace_period: 1m30s
    healthcheck:
      test: ["CMD", "wget", "-q", "http://127.0.0.1:8000/"]
      interval: 500ms
      timeout: 2s
      retries: 4
      start_period: 1h
    deploy:
      replicas: 3
      labels: [tier=front]
      resources:
        limits: {cpus: "0.5", memory: 64M, pids: 100}
        reservations: {cpus: 0.25, memory: 1g}
      restart_policy: {condition: on-failure, delay: 5s, max_attempts: 3, window: 2m}
      update_config: {parallelism: 2, delay: 10s, order: stop-first, failure_action: pause}
      rollback_config: {parallelism: 0, delay: 1s}
      placement: {constraints: ["node.labels.zone == b"]}
  api:
    command: sleep 1
    healthcheck: {x-http: ":8000/health", interval: 1s}
  job:
    command: sleep 1
    healthcheck: {test: ["NONE"]}
"""
    st = deploy(tmp_path, text)
    web = svc(st, "web")
    c = web.task.container
    assert c.command == ("python3", "-m", "http.server", "8000")
    assert (c.user, c.workdir, c.hostname, c.stop_signal, c.stop_grace_period) == \
        ("1000:1000", "/tmp", "front", "SIGINT", 90.0)
    h = c.healthcheck
    # (the CMD form runs without a shell, as Docker: images without /bin/sh)
    assert (h.command, h.exec, h.interval, h.timeout, h.retries, h.start_period) == \
        ("", ("wget", "-q", "http://127.0.0.1:8000/"), 0.5, 2.0, 4, 3600.0)
    assert web.replicas == 3 and web.labels == {"tier": "front", STACK_LABEL: "app"}
    r = web.task.resources
    assert (r.limits.cpu, r.limits.memory, r.limits.pids) == (0.5, 64 << 20, 100)
    assert (r.reservations.cpu, r.reservations.memory) == (0.25, 1 << 30)
    rp = web.task.restart
    assert (rp.condition, rp.delay, rp.max_attempts, rp.window) == ("on-failure", 5.0, 3, 120.0)
    assert (web.update.parallelism, web.update.delay) == (2, 10.0)
    assert (web.rollback.parallelism, web.rollback.delay) == (0, 1.0)
    assert web.task.placement.constraints == ("node.labels.zone==b",)
    assert svc(st, "api").task.container.healthcheck.http == ":8000/health"
    assert svc(st, "job").task.container.healthcheck.disable
    assert st.warnings == []  # every key above is one shoal holds


def test_secrets_configs_and_volumes_are_named_after_the_stack(tmp_path: Path) -> None:
    (tmp_path / "db.txt").write_text("s3cret")
    (tmp_path / "site.conf").write_text("listen 80")
    text = """
services:
  web:
    command: sleep 1
    secrets: [db, {source: ext, target: other, mode: 0400}]
    configs: [{source: site, target: /etc/nginx/nginx.conf, uid: "101", gid: 101,
               mode: 0440}, inline]
    volumes: ["data:/data", "./static:/static:ro", {type: tmpfs, target: /cache,
              tmpfs: {size: 1M}}, {type: volume, source: shared, target: /shared}]
secrets:
  db: {file: ./db.txt}
  ext: {external: true}
configs:
  site: {file: site.conf, labels: {role: web}}
  inline: {content: "x=${X:-1}"}
volumes:
  data:
  shared: {external: true, name: team-shared}
"""
    st = deploy(tmp_path, text)
    c = svc(st, "web").task.container
    assert [(r.name, r.target, r.mode) for r in c.secrets] == \
        [(versioned("app_db", b"s3cret"), "db", 0o444), ("ext", "other", 0o400)]
    # (docker's convertFileObject: an absolute target as is, the short form's target its
    # key, which the managers place at /inline, shoal.raft.spec.docker_file_defaults)
    assert [(r.name, r.target, r.uid, r.gid, r.mode) for r in c.configs] == \
        [(versioned("app_site", b"listen 80"), "/etc/nginx/nginx.conf", "101", "101", 0o440),
         (versioned("app_inline", b"x=1"), "inline", "", "", 0o444)]
    assert st.warnings == []  # (no "outside /run/configs", no uid/gid warning)
    assert [(m.type, m.source, m.target, m.readonly) for m in c.mounts] == [
        ("volume", "app_data", "/data", False),
        ("bind", str(tmp_path / "static"), "/static", True),
        ("tmpfs", "", "/cache", False),
        ("volume", "team-shared", "/shared", False)]
    assert c.mounts[2].tmpfs_size == 1 << 20
    secrets = {o.key: o for o in st.secrets}
    assert secrets["db"].data == b"s3cret" and secrets["db"].labels == {STACK_LABEL: "app"}
    assert secrets["ext"].external and secrets["ext"].name == "ext"
    configs = {o.key: o for o in st.configs}
    assert configs["inline"].data == b"x=1"
    assert configs["site"].labels == {"role": "web", STACK_LABEL: "app"}


def test_override_files_merge_maps_and_lists(tmp_path: Path) -> None:
    base = write(tmp_path, """
services:
  web:
    command: sleep 1
    environment: [A=1, B=1]
    ports: ["80:8000"]
    deploy: {replicas: 2, resources: {limits: {memory: 64M}}}
""")
    over = write(tmp_path, """
services:
  web:
    environment: {B: "2"}
    ports: ["80:8000", "443:8443"]
    deploy: {replicas: 5}
  api:
    command: sleep 2
""", "override.yml")
    st = load_stack("app", [base, over], {})
    web = svc(st, "web")
    assert web.task.container.env == {"A": "1", "B": "2"}
    assert [p.published for p in web.endpoint.ports] == [80, 443]
    assert web.replicas == 5 and web.task.resources.limits.memory == 64 << 20
    assert svc(st, "api").task.container.command == ("sleep", "2")


def test_override_items_with_the_same_target_replace_the_bases(tmp_path: Path) -> None:
    """compose-spec's merge: a volume, secret or config with the same target and a port
    with the same published port/target/protocol (in either syntax) replace the base's
    (they used to be refused as duplicates); a service's networks and deploy.labels merge
    as maps (the override's list dropped the base's)."""
    (tmp_path / "s.txt").write_text("x")
    base = write(tmp_path, """
services:
  web:
    command: sleep 1
    volumes: ["./a:/data", "./keep:/keep"]
    secrets: [s]
    ports: ["8080:80", "9000:9000"]
    networks: {front: {}}
    deploy: {labels: [x=1, y=2]}
secrets:
  s: {file: ./s.txt}
networks:
  front: {}
  back: {}
""")
    over = write(tmp_path, """
services:
  web:
    volumes: ["./b:/data"]
    secrets: [{source: s, target: s}]
    ports: [{target: 80, published: 8080}]
    networks: [back]
    deploy: {labels: {y: "3"}}
""", "override.yml")
    web = svc(load_stack("app", [base, over], {}), "web")
    mounts = {m.target: m.source for m in web.task.container.mounts}
    assert mounts == {"/data": str(tmp_path / "b"), "/keep": str(tmp_path / "keep")}
    assert [s.target for s in web.task.container.secrets] == ["s"]
    assert sorted((p.published, p.target) for p in web.endpoint.ports) == \
        [(8080, 80), (9000, 9000)]
    assert sorted(web.task.networks) == ["app_back", "app_front"]
    assert web.labels == {"x": "1", "y": "3", "com.docker.stack.namespace": "app"}


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("body", "expected"), [
    ("deploy: {replicas: three}",
     "services.web.deploy.replicas: expected an integer, got 'three'"),
    ("deploy: {replicas: -1}", "services.web.deploy.replicas: expected `int` >= 0"),
    ("stop_grace_period: soon", "services.web.stop_grace_period: invalid duration 'soon'"),
    ("deploy: {resources: {limits: {memory: lots}}}",
     "services.web.deploy.resources.limits.memory: invalid size 'lots'"),
    ("ports: ['80:x']", "services.web.ports[0]: expected [[IP:]PUBLISHED:]TARGET"),
    ("ports: ['2377:80']", "services.web.ports[0].published: port 2377 is used by shoal"),
    ("user: 'not a user'", "services.web.user: invalid value"),
    ("secrets: [nope]", "services.web.secrets[0]: undefined secret 'nope'"),
    ("volumes: ['data:/data']", "services.web.volumes[0]: undefined volume 'data'"),
    ("volumes: ['/x:relative']", "services.web.volumes[0]: must be an absolute path"),
    ("healthcheck: {test: 'true', x-http: ':80/'}",
     "services.web.healthcheck.x-http: give one check"),
    ("deploy: {placement: {constraints: ['node.colour==red']}}",
     "services.web.deploy.placement.constraints[0]: 'node.colour==red': unsupported key"),
    ("deploy: {mode: sideways}", "services.web.deploy.mode: expected replicated, global"),
    ("colour: red", "services.web.colour: unknown key (not in the Compose Specification)"),
    ("deploy: {replica: 2}", "services.web.deploy.replica: unknown key"),
    ("healthcheck: {test: [CMD]}", "services.web.healthcheck.test: expected"),
])
def test_an_invalid_file_is_refused_with_the_path_of_the_error(
        tmp_path: Path, body: str, expected: str) -> None:
    msg = error(tmp_path, f"services:\n  web:\n    command: sleep 1\n    {body}\n")
    assert msg.startswith(expected), msg


def test_file_level_errors_name_their_key(tmp_path: Path) -> None:
    assert error(tmp_path, "servics: {}\n").startswith("servics: unknown top-level key")
    assert error(tmp_path, "services: {}\n").startswith("services: the file defines no")
    assert error(tmp_path, "services:\n  w: {command: x}\nsecrets:\n  s: {file: ./gone}\n") \
        .startswith("secrets.s.file: cannot read")
    assert error(tmp_path, "services:\n  web.app: {command: x}\n").startswith("services.web.app: ")
    with pytest.raises(ComposeError, match="stack name 'Bad_Name' is invalid"):
        load_stack("Bad_Name", [write(tmp_path, "services:\n  w: {command: x}\n")], {})


# ----------------------------------------------------------------------------- warnings

def test_unsupported_keys_are_warned_once_naming_the_key_and_services(tmp_path: Path) -> None:
    text = """
services:
  web:
    build: .
    image: web:1
    container_name: w
    command: sleep 1
    shm_size: 64m
    networks: [back]
    deploy:
      mode: global
      endpoint_mode: dnsrr
      placement: {preferences: [{spread: node.labels.zone}], max_replicas_per_node: 1}
      update_config: {order: start-first, failure_action: rollback, monitor: 1m30s,
                      max_failure_ratio: 0.25}
      rollback_config: {order: start-first, failure_action: continue, monitor: 2s}
    x-note: extension keys are skipped
  api:
    build: ./api
    image: reg:5000/api:1
    depends_on: [web]
    command: sleep 1
networks:
  back: {}
x-common: &common {}
"""
    st = deploy(tmp_path, text)
    assert len(st.services) == 2
    w = st.warnings
    assert not any(x.startswith("build") for x in w)  # (built: shoal.cli.compose_build)
    assert [b.key for b in st.builds] == ["web", "api"]
    for key in ("container_name", "depends_on", "shm_size"):
        assert sum(x.startswith(key + ":") for x in w) == 1, (key, w)
    assert all("not supported yet" in x for x in w if x.startswith(("shm_size", "deploy.")))
    web = st.services[0]
    assert web.endpoint.mode == "dnsrr" and not any("endpoint_mode" in x for x in w)
    assert (web.mode.type, web.task.placement.max_replicas) == ("global", 1)
    assert [p.spread for p in web.task.placement.preferences] == ["node.labels.zone"]
    # update_config/rollback_config map onto the spec's UpdateConfig/RollbackConfig
    assert not any(x.startswith(("deploy.update_config", "deploy.rollback_config")) for x in w)
    u, r = web.update, web.rollback
    assert (u.order, u.failure_action, u.monitor, u.max_failure_ratio) == \
        ("start-first", "rollback", 90.0, 0.25)
    assert (r.order, r.failure_action, r.monitor) == ("start-first", "continue", 2.0)


def test_every_key_rule_is_a_handler_a_section_or_a_reason() -> None:
    for key, rule in compose.KEYS.items():
        assert (rule.handle is not None) + rule.section + bool(rule.why) == 1, key
        parent = key.rpartition(".")[0]
        assert not parent or compose.KEYS[parent].section, key


# ----------------------------------------------------------------------------- the plan

def cluster_service(spec: ServiceSpec, version: int = 3) -> dict[str, Any]:
    return {"id": spec.name + "-id", "name": spec.name, "version": version,
            "spec": to_dict(spec)}


STACK = """
services:
  web: {command: sleep 1, ports: ["8080:8000"]}
  api: {command: sleep 2}
configs:
  conf: {content: "v1"}
"""


def test_a_redeploy_updates_only_the_changed_services(tmp_path: Path) -> None:
    first = deploy(tmp_path, STACK)
    cluster = [cluster_service(s) for s in first.services]
    # the cluster bumped web's force_update counter: that is not a change of the file
    cluster[0]["spec"]["task"]["force_update"] = 2
    conf = {"id": "c1", "name": versioned("app_conf", b"v1"), "labels": {STACK_LABEL: "app"},
            "data": base64.b64encode(b"v1").decode()}
    plan = plan_deploy(first, cluster, {"secret": [], "config": [conf]}, prune=False)
    assert plan.create == [] and plan.update == [] and plan.objects == []
    assert sorted(plan.unchanged) == ["app_api", "app_web"]

    second = deploy(tmp_path, STACK.replace("sleep 2", "sleep 3"))
    plan = plan_deploy(second, cluster, {"secret": [], "config": [conf]}, prune=False)
    assert [(s.name, v) for s, v in plan.update] == [("app_api", 3)]
    assert plan.unchanged == ["app_web"]


def test_prune_removes_only_the_stacks_services_missing_from_the_file(tmp_path: Path) -> None:
    st = deploy(tmp_path, STACK)
    gone = cluster_service(deploy(tmp_path, "services:\n  old: {command: x}\n").services[0])
    other = cluster_service(deploy(tmp_path, "services:\n  old: {command: x}\n",
                                   stack="other").services[0])
    plain = {"id": "p", "name": "plain", "version": 1,
             "spec": {"name": "plain", "labels": {}, "task": {"container": {"command": ["x"]}}}}
    objects: dict[str, list[dict[str, Any]]] = {"secret": [], "config": []}
    assert plan_deploy(st, [gone, other, plain], objects, prune=False).remove == []
    plan = plan_deploy(st, [gone, other, plain], objects, prune=True)
    assert plan.remove == ["app_old"]
    assert sorted(s.name for s in plan.create) == ["app_api", "app_web"]
    assert [o.name for o in plan.objects] == [versioned("app_conf", b"v1")]


def test_conflicts_are_found_before_any_write(tmp_path: Path) -> None:
    st = deploy(tmp_path, STACK)
    objects: dict[str, list[dict[str, Any]]] = {"secret": [], "config": []}
    outsider = {"id": "x", "name": "app_web", "version": 1,
                "spec": {"name": "app_web", "labels": {}}}
    with pytest.raises(CliError, match="service app_web exists and is not part of stack app"):
        plan_deploy(st, [outsider], objects, prune=False)
    port_owner = {"id": "y", "name": "front", "version": 1, "spec": {
        "name": "front", "endpoint": {"ports": [{"published": 8080, "target": 80}]}}}
    with pytest.raises(CliError, match="port 8080/tcp is already published by service front"):
        plan_deploy(st, [port_owner], objects, prune=False)
    changed = {"id": "c1", "name": "app_conf", "labels": {STACK_LABEL: "app"},
               "data": base64.b64encode(b"v0").decode()}
    named = deploy(tmp_path, STACK.replace('{content: "v1"}', '{content: "v1", name: app_conf}'))
    with pytest.raises(CliError, match=r"configs\.conf: config app_conf changed"):
        plan_deploy(named, [], {"secret": [], "config": [changed]}, prune=False)
    ext = deploy(tmp_path, "services:\n  w: {command: x, secrets: [k]}\n"
                 "secrets:\n  k: {external: true}\n")
    with pytest.raises(CliError, match="external secret 'k' not found"):
        plan_deploy(ext, [], objects, prune=False)


def versioned(name: str, data: bytes) -> str:
    return f"{name}-{hashlib.sha256(data).hexdigest()[:10]}"


def test_a_changed_secret_file_is_a_new_object_and_a_rolling_update(tmp_path: Path) -> None:
    """Beyond Swarm (which refuses): the created object is named after its content, so a
    changed file makes a new one, the services using it update (same target), and the old
    one is stale once no service uses it."""
    text = ("services:\n  web: {command: x, secrets: [tok]}\n  api: {command: y}\n"
            "secrets:\n  tok: {file: ./tok.txt}\n")
    (tmp_path / "tok.txt").write_text("one")
    first = deploy(tmp_path, text)
    old = versioned("app_tok", b"one")
    assert [o.name for o in first.secrets] == [old]
    cluster = [cluster_service(s) for s in first.services]
    have = {"secret": [{"id": "s1", "name": old, "labels": {STACK_LABEL: "app"}}],
            "config": []}
    plan = plan_deploy(first, cluster, have, prune=False)
    assert plan.objects == [] and plan.update == [] and plan.stale == []

    (tmp_path / "tok.txt").write_text("two")
    second = deploy(tmp_path, text)
    new = versioned("app_tok", b"two")
    ref = svc(second, "web").task.container.secrets[0]
    assert (ref.name, ref.target) == (new, "tok")
    plan = plan_deploy(second, cluster, have, prune=False)
    assert [o.name for o in plan.objects] == [new]
    assert [s.name for s, _ in plan.update] == ["app_web"] and plan.unchanged == ["app_api"]
    assert plan.stale == [("secret", "s1", old)]
    # a service outside the stack that uses the old object keeps it
    user = cluster_service(deploy(tmp_path, text, stack="other").services[0])
    user["spec"]["task"]["container"]["secrets"] = [{"name": old, "target": "t"}]
    assert plan_deploy(second, [*cluster, user], have, prune=False).stale == []


def test_the_stack_label_is_the_one_dns_reads() -> None:
    from shoal.node import mesh
    assert mesh.STACK_LABEL == STACK_LABEL == "com.docker.stack.namespace"


def test_an_image_the_managers_pinned_to_a_digest_is_not_a_change(tmp_path: Path) -> None:
    """The managers resolve a registry tag to its digest (`--resolve-image`): the cluster
    holds `reg:5000/app:1@sha256:…` for the file's `reg:5000/app:1`, which is no change; an
    edited tag in the file is one."""
    text = "services:\n  web: {image: 'reg:5000/app:1', command: sleep 1}\n"
    first = deploy(tmp_path, text)
    cluster = [cluster_service(s) for s in first.services]
    cluster[0]["spec"]["task"]["container"]["image"] = "reg:5000/app:1@sha256:" + "a" * 64
    plan = plan_deploy(first, cluster, {"secret": [], "config": []}, prune=False)
    assert plan.update == [] and plan.unchanged == ["app_web"]
    second = deploy(tmp_path, text.replace("app:1", "app:2"))
    plan = plan_deploy(second, cluster, {"secret": [], "config": []}, prune=False)
    assert [s.name for s, _ in plan.update] == ["app_web"]


NETS = """
services:
  web: {command: sleep 1, networks: [front, back]}
  db:
    command: sleep 1
    networks: {back: {aliases: [database]}}
  tool: {command: sleep 1}
networks:
  front: {}
  back: {internal: true, ipam: {config: [{subnet: 10.97.9.0/24}]}, labels: {tier: data}}
  shared: {external: true, name: corp-net}
"""


def test_networks_are_the_stacks_overlays_and_services_join_the_ones_they_name(
        tmp_path: Path) -> None:
    """Top-level networks become overlay networks named STACK_KEY (internal, subnet and
    labels kept, the stack's label added; external ones by their own name); a service joins
    the networks it lists (list or map form; aliases kept per network); one that lists none stays
    on the cluster's default network."""
    st = deploy(tmp_path, NETS)
    nets = {n.key: n for n in st.networks}
    assert (nets["front"].name, nets["front"].internal) == ("app_front", False)
    back = nets["back"]
    assert (back.name, back.internal, back.subnet) == ("app_back", True, "10.97.9.0/24")
    assert back.labels == {"tier": "data", STACK_LABEL: "app"}
    assert (nets["shared"].name, nets["shared"].external) == ("corp-net", True)
    specs = {s.name: s for s in st.services}
    assert list(specs["app_web"].task.networks) == ["app_front", "app_back"]
    assert list(specs["app_db"].task.networks) == ["app_back"]
    assert list(specs["app_tool"].task.networks) == []
    assert specs["app_db"].task.network_aliases == {"app_back": ("database",)}
    assert not any(w.startswith("networks.aliases:") for w in st.warnings), st.warnings

    plan = plan_deploy(st, [], {"secret": [], "config": []}, prune=False,
                       networks=[{"name": "corp-net", "labels": {}}])
    assert sorted(n.name for n in plan.networks) == ["app_back", "app_front"]
    with pytest.raises(CliError, match="external network 'corp-net' not found"):
        plan_deploy(st, [], {"secret": [], "config": []}, prune=False, networks=[])
    with pytest.raises(CliError, match="a network named 'app_front' exists"):
        plan_deploy(st, [], {"secret": [], "config": []}, prune=False,
                    networks=[{"name": "corp-net", "labels": {}},
                              {"name": "app_front", "labels": {}}])


def test_network_mode_host_and_none_and_swarms_external_host_network(tmp_path: Path) -> None:
    """Compose's ``network_mode: host|none`` and Swarm's stack idiom (an external network
    named host) are the task's network mode; ``bridge`` is the cluster network (the default);
    the external host network needs no `network create`; a host-mode port published on its
    own target is dropped with a warning, as Docker Compose does."""
    st = deploy(tmp_path, "services:\n"
                "  h: {command: sleep 1, network_mode: host, ports: ['8081:8080']}\n"
                "  n: {command: sleep 1, network_mode: none}\n"
                "  b: {command: sleep 1, network_mode: bridge}\n"
                "  s: {command: sleep 1, networks: [hostnet]}\n"
                "  p: {command: sleep 1, network_mode: host, ports: ['80:80', '8082:82']}\n"
                "networks:\n  hostnet: {external: true, name: host}\n")
    modes = {s.name: (s.task.network_mode, s.task.networks) for s in st.services}
    assert modes == {"app_h": ("host", ()), "app_n": ("none", ()), "app_b": ("default", ()),
                     "app_s": ("host", ()), "app_p": ("host", ())}
    assert [(p.published, p.target) for p in svc(st, "p").endpoint.ports] == [(8082, 82)]
    assert [(p.published, p.target) for p in svc(st, "h").endpoint.ports] == [(8081, 8080)]
    assert len(st.warnings) == 1 and "80:80 with network_mode: host is not published" in \
        st.warnings[0] and "(service p)" in st.warnings[0], st.warnings
    plan = plan_deploy(st, [], {"secret": [], "config": []}, prune=False, networks=[])
    assert plan.networks == []


@pytest.mark.parametrize(("text", "error"), [
    ("services: {web: {command: sleep 1, networks: [nope]}}",
     "services.web.networks.nope: not declared under the top-level networks:"),
    ("services: {web: {command: sleep 1}}\nnetworks: {n: {driver: macvlan}}",
     "networks.n.driver: expected overlay"),
    ("services: {web: {command: sleep 1}}\nnetworks: {n: {colour: red}}",
     "networks.n.colour: unknown key"),
    ("services: {web: {command: sleep 1, networks: true}}",
     "services.web.networks: expected a list of networks or a mapping, got True"),
    ("services: {web: {command: sleep 1, network_mode: host, networks: [n]}}\n"
     "networks: {n: {}}", "services.web.networks: tasks with network mode host join no other"),
])
def test_bad_networks_are_refused_with_their_path(tmp_path: Path, text: str,
                                                  error: str) -> None:
    with pytest.raises(ComposeError, match=re.escape(error)):
        deploy(tmp_path, text)


def test_a_bridge_network_is_deployed_as_an_overlay_with_a_warning(tmp_path: Path) -> None:
    """``driver: bridge`` (docker compose's default, written out by many files) is the
    stack's overlay network, said once; docker stack deploy refuses such a file."""
    st = deploy(tmp_path, "services: {web: {command: sleep 1, networks: [back]}}\n"
                "networks: {back: {driver: bridge}}")
    (net,) = st.networks
    assert net.name == "app_back" and not net.external
    assert [w for w in st.warnings if "networks.back.driver: bridge" in w and
            "deployed as overlay" in w], st.warnings


def test_a_service_with_neither_image_nor_command_is_told_about_image(tmp_path: Path
                                                                     ) -> None:
    """(`build:` without `image:` is built by the deploy: tests/test_compose_build.py)"""
    msg = error(tmp_path, "services:\n  web:\n    environment: [A=1]\n")
    assert msg.startswith("services.web.image: is required")


def test_the_default_network_once_the_file_names_it(tmp_path: Path) -> None:
    """Declared (here: an existing network) or listed by a service, `default` is a network of
    the stack and every service that lists none joins it, as in Swarm; a file that never
    names it leaves its services on the cluster network."""
    st = deploy(tmp_path, """
services:
  web: {image: nginx}
  api: {image: nginx, networks: [default, back]}
  host: {image: nginx, network_mode: host}
networks:
  default: {external: true, name: traefik-public}
  back: {}
""")
    assert svc(st, "web").task.networks == ("traefik-public",)
    assert svc(st, "api").task.networks == ("traefik-public", "app_back")
    assert svc(st, "host").task.networks == ()
    st = deploy(tmp_path, "services:\n  a: {image: x, networks: [default]}\n  b: {image: x}\n")
    assert [n.name for n in st.networks] == ["app_default"]
    assert svc(st, "b").task.networks == ("app_default",)
    assert st.networks[0].labels == {"com.docker.stack.namespace": "app"}
    st = deploy(tmp_path, "services:\n  a: {image: x}\n")
    assert st.networks == [] and svc(st, "a").task.networks == ()


def test_expose_endpoint_mode_and_restart_are_read(tmp_path: Path) -> None:
    """`expose:` gives the VIP's ports (shoal's VIP serves only declared ports), endpoint_mode
    the endpoint; `restart:` is the restart policy when deploy.restart_policy is absent (as
    docker stack deploy)."""
    st = deploy(tmp_path, """
services:
  a: {image: x, expose: ["8081", 9000, "7000-7001/udp"], restart: "on-failure:3"}
  b: {image: x, deploy: {endpoint_mode: dnsrr}, restart: "no"}
  c: {image: x, restart: always, deploy: {restart_policy: {condition: none}}}
  d: {image: x, restart: unless-stopped}
""")
    a = svc(st, "a")
    assert [(e.port, e.protocol) for e in a.endpoint.expose] == \
        [(8081, "tcp"), (9000, "tcp"), (7000, "udp"), (7001, "udp")]
    assert a.endpoint.vip_ports() == ((8081, "tcp"), (9000, "tcp"), (7000, "udp"),
                                      (7001, "udp"))
    assert (a.task.restart.condition, a.task.restart.max_attempts) == ("on-failure", 3)
    assert svc(st, "b").endpoint.mode == "dnsrr"
    assert svc(st, "b").task.restart.condition == "none"
    assert svc(st, "c").task.restart.condition == "none"  # deploy.restart_policy wins
    assert svc(st, "d").task.restart.condition == "any"
    assert not st.warnings
    assert error(tmp_path, "services:\n  a: {image: x, restart: sometimes}\n") == \
        "services.a.restart: expected no, always, unless-stopped or on-failure[:N], " \
        "got 'sometimes'"
    assert error(tmp_path, "services:\n  a: {image: x, expose: [80/sctp]}\n").startswith(
        "services.a.expose[0]: expected PORT")
    assert error(tmp_path, "services:\n  a: {image: x, deploy: {endpoint_mode: rr}}\n") == \
        "services.a.deploy.endpoint_mode: expected vip or dnsrr, got 'rr'"


def test_what_docker_refuses_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = error(tmp_path, "services:\n  a:\n    image: x\n    image: y\n")
    assert "line 4" in msg and "the key 'image' is given twice" in msg
    msg = error(tmp_path, "services:\n  a: {image: x, healthcheck: {test: 'true', "
                          "disable: true}}\n")
    assert msg.startswith("services.a.healthcheck.disable: test and disable cannot be set")
    msg = error(tmp_path, "services:\n  a: {image: x, env_file: [{path: a.env, "
                          "requried: false}]}\n")
    assert msg == "services.a.env_file[0].requried: unknown key (not in the Compose " \
        "Specification)"
    # merge keys still override what they bring
    st = deploy(tmp_path, "x-base: &b {image: x, command: [a]}\nservices:\n  a:\n"
                          "    <<: *b\n    command: [b]\n")
    assert svc(st, "a").task.container.command == ("b",)


def test_env_file_quotes_comments_and_bom(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text('\ufeffA="x y" # why\nB=\'z\' # c\nC=plain # c\n'
                                    'D="q\\"uote"\n', encoding="utf-8")
    st = deploy(tmp_path, "services:\n  a: {image: x, env_file: a.env}\n")
    assert svc(st, "a").task.container.env == {"A": "x y", "B": "z", "C": "plain",
                                                "D": 'q"uote'}


def test_env_file_syntax_as_docker_documents_it(tmp_path: Path) -> None:
    """Docker's .env syntax: ${VAR} forms interpolated in unquoted and double-quoted values
    (from the keys above and the environment), single quotes literal, escapes and lines
    continued inside double quotes, a bare KEY from the environment (left out when unset);
    a quote never closed, or text after one, is an error naming the file and line."""
    (tmp_path / "a.env").write_text(
        "A=x\nB='lit $A'\nC=pre-$A\nD=\"tab\\t${A}\"\nE=${NOPE:-dflt}\nFROM_SHELL\n"
        "UNSET_HERE\nPEM=\"-----BEGIN\nline2\n-----END\"\n")
    st = deploy(tmp_path, "services:\n  a: {image: x, env_file: a.env}\n",
                env={"FROM_SHELL": "s"})
    assert svc(st, "a").task.container.env == {
        "A": "x", "B": "lit $A", "C": "pre-x", "D": "tab\tx", "E": "dflt",
        "FROM_SHELL": "s", "PEM": "-----BEGIN\nline2\n-----END"}
    (tmp_path / "a.env").write_text("OK=1\nBAD=\"never closed\n")
    assert error(tmp_path, "services:\n  a: {image: x, env_file: a.env}\n").endswith(
        ":2: BAD: the double quote is never closed")


def test_volume_driver_and_options_reach_the_mounts(tmp_path: Path) -> None:
    """A declared volume's `driver`/`driver_opts` ride on every mount of it, as the CLI's
    `--mount volume-driver=,volume-opt=` (NFS through local's type/o/device, or sshfs);
    a driver or options the runtime would refuse are refused naming the key."""
    st = deploy(tmp_path, """
services:
  db: {image: x, volumes: ["db:/var/lib/db", {type: volume, source: files, target: /f},
                           "plain:/p"]}
volumes:
  db: {driver: local, driver_opts: {type: nfs, o: "addr=10.0.0.1,rw", device: ":/exports"}}
  files: {driver: sshfs, driver_opts: {sshcmd: "u@files:/srv"}}
  plain: {}
""")
    mounts = {m.target: m for m in svc(st, "db").task.container.mounts}
    assert (mounts["/var/lib/db"].volume_driver, mounts["/var/lib/db"].volume_opts) == \
        ("local", {"type": "nfs", "o": "addr=10.0.0.1,rw", "device": ":/exports"})
    assert (mounts["/f"].volume_driver, mounts["/f"].volume_opts) == \
        ("sshfs", {"sshcmd": "u@files:/srv"})
    assert (mounts["/p"].volume_driver, mounts["/p"].volume_opts) == ("", {})
    assert not st.warnings
    assert error(tmp_path, "services: {a: {image: x, volumes: ['v:/v']}}\n"
                           "volumes: {v: {driver: flocker}}\n").startswith(
        "volumes.v.driver: ") and "flocker" in \
        error(tmp_path, "services: {a: {image: x}}\nvolumes: {v: {driver: flocker}}\n")
    assert error(tmp_path, "services: {a: {image: x}}\n"
                           "volumes: {v: {driver_opts: {type: nfs}}}\n").startswith(
        "volumes.v.driver_opts: ")


def test_entrypoint_with_an_image_replaces_the_images(tmp_path: Path) -> None:
    st = deploy(tmp_path, """
services:
  a: {image: busybox, entrypoint: ["/bin/sh", "-c"], command: ["echo $$HOME"]}
  b: {image: busybox, entrypoint: "tini -- run", command: go}
  c: {image: busybox, entrypoint: []}
  d: {entrypoint: [sleep], command: ["1"]}
""")
    a, b = svc(st, "a").task.container, svc(st, "b").task.container
    assert (a.entrypoint, a.command) == (("/bin/sh", "-c"), ("echo $HOME",))
    assert (b.entrypoint, b.command) == (("tini", "--", "run"), ("go",))
    assert svc(st, "c").task.container.entrypoint == ()  # [] keeps the image's (as Swarm)
    d = svc(st, "d").task.container  # no image: the host's program, entrypoint + command
    assert (d.entrypoint, d.command) == ((), ("sleep", "1"))
    assert not st.warnings


def test_tmpfs_options_beyond_size_are_warned_by_name(tmp_path: Path) -> None:
    st = deploy(tmp_path, "services:\n  a: {image: x, tmpfs: ['/run:size=64m,mode=1777']}\n")
    (m,) = svc(st, "a").task.container.mounts
    assert (m.type, m.target, m.tmpfs_size) == ("tmpfs", "/run", 64 << 20)
    assert [w.split(":")[0] for w in st.warnings] == ["tmpfs (mode)"]


def test_terminal_oom_and_container_label_keys_become_the_containers_settings(
        tmp_path: Path) -> None:
    """tty and stdin_open (the `tty: true` that keeps a shell up), oom_score_adj, and the
    service-level `labels` (the container's; deploy.labels stays the service's); no warning
    for any of them, and a bad one names its key."""
    text = """
services:
  shell:
    image: alpine:3
    tty: true
    stdin_open: true
    oom_score_adj: 300
    labels: [com.example.role=debug]
    deploy:
      labels: {com.example.team: ops}
  api:
    image: api:1
    labels: {traefik.enable: "true"}
"""
    st = deploy(tmp_path, text)
    shell, api = svc(st, "shell"), svc(st, "api")
    c = shell.task.container
    assert c.tty and c.stdin_open and c.oom_score_adj == 300
    assert c.labels == {"com.example.role": "debug"}
    assert shell.labels["com.example.team"] == "ops" and "com.example.role" not in shell.labels
    assert api.task.container.labels == {"traefik.enable": "true"} and not api.task.container.tty
    assert not any(k in w for w in st.warnings for k in ("tty", "stdin_open", "oom", "labels"))
    for bad, where in (("    oom_score_adj: 2000", "services.db.oom_score_adj"),
                       ("    tty: maybe", "services.db.tty")):
        with pytest.raises(ComposeError) as exc:
            deploy(tmp_path, f"services:\n  db:\n    image: db:1\n{bad}\n")
        assert exc.value.path == where, (bad, exc.value)


def test_security_and_kernel_keys_become_the_containers_settings(tmp_path: Path) -> None:
    """cap_add/cap_drop, read_only, extra_hosts (list and mapping forms), ulimits (a number or
    soft/hard), sysctls (mapping or list) as Swarm reads them; a bad one names its key."""
    text = """
services:
  db:
    image: postgres:16
    read_only: true
    cap_add: [SYS_NICE]
    cap_drop: [ALL]
    extra_hosts: ["ldap:10.0.0.7", "proxy=10.0.0.8"]
    ulimits:
      nproc: 65535
      nofile: {soft: 20000, hard: 40000}
    sysctls:
      net.core.somaxconn: 1024
      kernel.shmmax: 68719476736
  api:
    image: api:1
    extra_hosts: {cache: 10.0.0.9, both: [10.0.0.10, "::1"]}
    sysctls: ["net.ipv4.tcp_syncookies=0"]
"""
    st = deploy(tmp_path, text)
    db, api = svc(st, "db").task.container, svc(st, "api").task.container
    assert db.read_only and db.cap_add == ("SYS_NICE",) and db.cap_drop == ("ALL",)
    assert db.extra_hosts == ("ldap:10.0.0.7", "proxy:10.0.0.8")
    assert [(u.name, u.soft, u.hard) for u in db.ulimits] == [("nproc", 65535, 65535),
                                                             ("nofile", 20000, 40000)]
    assert db.sysctls == {"net.core.somaxconn": "1024", "kernel.shmmax": "68719476736"}
    assert api.extra_hosts == ("cache:10.0.0.9", "both:10.0.0.10", "both:::1")
    assert api.sysctls == {"net.ipv4.tcp_syncookies": "0"} and not api.read_only
    assert not any(k in w for w in st.warnings for k in ("cap_add", "ulimits", "sysctls"))
    for bad, where in (("    ulimits: {nofile: {soft: 1}}", "services.db.ulimits.nofile"),
                       ("    sysctls: {vm.swappiness: 10}", "services.db.sysctls"),
                       ("    extra_hosts: [ldap]", "services.db.extra_hosts[0]"),
                       ("    cap_add: [FLY]", "services.db.cap_add")):
        with pytest.raises(ComposeError) as exc:
            deploy(tmp_path, f"services:\n  db:\n    image: db:1\n{bad}\n")
        assert exc.value.path == where, (bad, exc.value)


def test_stack_config_prints_the_files_merged_and_interpolated(tmp_path: Path) -> None:
    """`shoal stack config` (docker's): what deploy reads, as YAML, with no cluster; the
    file's own error otherwise; ``${VAR}`` as written with --skip-interpolation."""
    import yaml

    from shoal.cli.stack import config_text

    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text("services:\n  web:\n    image: busybox:${TAG:-1}\n    command: sleep 1\n")
    b.write_text("services:\n  web:\n    environment: [A=1]\n  db: {image: pg}\n")
    (tmp_path / ".env").write_text("TAG=2\n")
    assert yaml.safe_load(config_text([a, b], {})) == {"services": {
        "web": {"image": "busybox:2", "command": "sleep 1", "environment": ["A=1"]},
        "db": {"image": "pg"}}}
    assert "busybox:${TAG:-1}" in config_text([a], {}, interpolation=False)
    with pytest.raises(ComposeError, match=r"gone\.yml: cannot read"):
        config_text([tmp_path / "gone.yml"], {})


def test_stack_config_output_deploys_as_its_input_does(tmp_path: Path) -> None:
    """A `$$` (a literal dollar) is printed `$$` again, so the printed file interpolates to
    the same specs (before: `$5` came back as an invalid interpolation); no YAML anchors."""
    from shoal.cli.stack import config_text

    src = tmp_path / "in.yml"
    src.write_text('x-env: &env {PRICE: "$$5", HOME_IS: "$$HOME"}\nservices:\n'
                   '  a: {command: [echo], environment: *env}\n'
                   '  b: {command: [echo], environment: *env}\n')
    printed = tmp_path / "out.yml"
    printed.write_text(config_text([src], {}))
    assert "&id" not in printed.read_text() and "*id" not in printed.read_text()
    assert load_stack("st", [printed], {}).services == load_stack("st", [src], {}).services
    # strings a YAML 1.2 reader (shoal's) or a 1.1 one would take for numbers or booleans
    # are quoted (before: "1e3" came back as 1000.0 and "0o17" as 15)
    import yaml

    src.write_text('services:\n  a:\n    command: [echo]\n    environment: {SCI: "1e3", '
                   'OCT: "0o17", YES: "yes", OFF: "off", N: 1e3}\n')
    printed.write_text(config_text([src], {}))
    assert load_stack("st", [printed], {}).services == load_stack("st", [src], {}).services
    assert yaml.safe_load(printed.read_text())["services"]["a"]["environment"] == {
        "SCI": "1e3", "OCT": "0o17", "YES": "yes", "OFF": "off", "N": 1000.0}


def test_a_redeploy_without_with_registry_auth_keeps_the_services_credentials(
        tmp_path: Path) -> None:
    """As docker's: the flag absent keeps what a service has (before: it turned it off and
    rolled every task, whose new ones then lacked credentials)."""
    from shoal.cli.stack import with_auth

    st = deploy(tmp_path, STACK)
    cluster = [cluster_service(with_auth(s)) for s in st.services]
    plan = plan_deploy(st, cluster, {"secret": [], "config": []}, prune=False)
    assert plan.update == [] and sorted(plan.unchanged) == ["app_api", "app_web"]


def test_what_docker_stack_deploy_takes_from_real_files_deploys_with_warnings(
        tmp_path: Path) -> None:
    """Keys of real files (awesome-compose's ELK, node-exporter, a VPN sidecar) that docker
    stack deploy takes, read as it does, or warned about and left out where shoal cannot do
    them, instead of the whole file refused: env names with dots, other log drivers and
    options, bind propagation, another container's network namespace, an empty deploy:,
    Docker's size units, a grace period over an hour, pre_start hooks, encrypted overlays."""
    st = deploy(tmp_path, """
services:
  es:
    image: elasticsearch:8
    environment: [discovery.type=single-node, ES_JAVA_OPTS=-Xms512m]
    stop_grace_period: 2h
    deploy:
    logging: {driver: gelf, options: {gelf-address: "udp://graylog:12201"}}
  files:
    image: busybox
    logging: {driver: json-file, options: {max-size: 10m, max-file: "3", compress: "true"}}
    volumes: ["/:/host:ro,rslave"]
    deploy: {resources: {limits: {memory: 512MiB}, reservations: {memory: 1.5Gi}}}
    network_mode: "service:es"
    pre_start: [{command: [true]}]
    extra_hosts: ["host.docker.internal:host-gateway"]
    networks: [back]
networks:
  back: {driver_opts: {encrypted: ""}}
""")
    es, files = svc(st, "es"), svc(st, "files")
    assert es.task.container.env == {"discovery.type": "single-node",
                                     "ES_JAVA_OPTS": "-Xms512m"}
    assert es.task.container.stop_grace_period == 7200.0
    assert es.task.container.log_driver == "" and es.task.container.log_options == {}
    assert files.task.container.log_driver == "json-file"
    assert files.task.container.log_options == {"max-size": "10m", "max-file": "3"}
    (bind,) = files.task.container.mounts
    assert (bind.type, bind.source, bind.target, bind.readonly) == ("bind", "/", "/host", True)
    assert files.task.resources.limits.memory == 512 << 20
    assert files.task.resources.reservations.memory == 3 << 29
    assert files.task.network_mode == "default" and files.task.container.extra_hosts == (
        "host.docker.internal:host-gateway",)
    warned = "\n".join(st.warnings)
    for said in ("logging.driver: gelf: not supported", "logging.options.compress: not "
                 "supported", "bind propagation rslave", "network_mode: service:es: ignored",
                 "pre_start: ignored", "networks.driver_opts.encrypted: not supported: the "
                 "traffic of this overlay between nodes is NOT encrypted"):
        assert said in warned, (said, st.warnings)
    assert "discovery" not in warned and "memory" not in warned


@pytest.mark.parametrize(("text", "said"), [
    ("services: {web: {image: nginx, logging: {driver: gelf, colour: red}}}",
     "services.web.logging.colour: unknown key"),
    ("services: {web: {image: nginx, logging: {options: {max-size: 1}}}}",
     "max-size"),
    ("services: {web: {image: nginx, environment: ['A B=1']}}",
     "services.web.environment: name 'A B' is invalid"),
    ("services: {web: {image: nginx, deploy: {resources: {limits: {memory: 1.2.3G}}}}}",
     "invalid size '1.2.3G'"),
    ("services: {web: {image: nginx, stop_grace_period: 800h}}", "stop_grace_period"),
    ("services: {web: {image: nginx, extra_hosts: ['db:host-gateways']}}",
     "'host-gateways' in 'db:host-gateways' is not an IP address"),
])
def test_values_docker_refuses_stay_refused_naming_their_key(tmp_path: Path, text: str,
                                                             said: str) -> None:
    assert said in error(tmp_path, text)


def test_x_shoal_autoscale_declares_autoscaling_and_a_redeploy_keeps_the_count(
        tmp_path: Path) -> None:
    """`x-shoal-autoscale` is `--autoscale` in a file (docker ignores x- keys); a redeploy of
    the same file over a service the autoscaler moved to 7 changes nothing (before: the
    file's count was refused by the state machine, or, without the key, autoscaling went
    off without a word — now said)."""
    text = """
services:
  web:
    command: sleep 1
    deploy: {replicas: 2, resources: {limits: {cpus: "0.5"}}}
    x-shoal-autoscale: {min: 2, max: 20, cpu: 60%, stabilization: 2m, step: 4}
"""
    st = deploy(tmp_path, text)
    auto = svc(st, "web").mode.autoscale
    assert (auto.min, auto.max, auto.cpu, auto.stabilization, auto.step) == \
        (2, 20, 0.6, 120.0, 4)
    scaled = msgspec.structs.replace(svc(st, "web"), mode=msgspec.structs.replace(
        svc(st, "web").mode, replicas=7))
    plan = plan_deploy(st, [cluster_service(scaled)], {"secret": [], "config": []},
                       prune=False)
    assert plan.unchanged == ["app_web"] and plan.warnings == []
    plain = deploy(tmp_path, text.replace("    x-shoal-autoscale", "    x-other"))
    plan = plan_deploy(plain, [cluster_service(scaled)], {"secret": [], "config": []},
                       prune=False)
    assert [s.mode.replicas for s, _ in plan.update] == [2]
    assert "turns autoscaling off" in plan.warnings[0]


@pytest.mark.parametrize(("body", "said"), [
    ("{min: 2, cpu: 60%}", "x-shoal-autoscale.max: is required"),
    ("{min: 2, max: 9, cpu: 60}", "cpu=60: write a percentage"),
    ("{min: 2, max: 9, cpu: [60]}", "x-shoal-autoscale.cpu: expected a number"),
    ("{min: 2, max: 9, colour: 60%}", "unknown option"),
])
def test_a_bad_x_shoal_autoscale_is_refused_naming_it(tmp_path: Path, body: str,
                                                      said: str) -> None:
    assert said in error(tmp_path, f"services:\n  web:\n    command: sleep 1\n"
                                   f"    x-shoal-autoscale: {body}\n")


def test_an_unknown_x_shoal_key_is_a_typo_said_not_skipped(tmp_path: Path) -> None:
    msg = error(tmp_path, "services:\n  web:\n    command: sleep 1\n"
                          "    x-shoal-autoscaling: {min: 1, max: 2, cpu: 50%}\n")
    assert "services.web.x-shoal-autoscaling: unknown shoal extension" in msg
    assert "x-shoal-autoscale" in msg
    deploy(tmp_path, "services:\n  web:\n    command: sleep 1\n    x-anything: 1\n")
