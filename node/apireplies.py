"""The replies of the agent's HTTP API, as JSON Schema (the ``components`` of the OpenAPI
document shoal.node.openapi builds): the views the handlers build as dicts, described by hand.

Owns: ``REPLIES`` (name → schema) and the small constructors the route table uses too
(``obj``, ``list_of``, ``ref``, ``nullable``, the scalar schemas). Must not touch: routes and
request bodies (shoal.node.openapi, shoal.node.apibodies), handlers.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


# --------------------------------------------------------------------------- replies
# Replies are the views the handlers build as dicts (shoal.node.views and the control
# modules): described here by hand, open objects (fields may be added, see docs/api.md).

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "number", "description": "Unix time, seconds"}


def obj(description: str, **props: Schema) -> Schema:
    return {"type": "object", "description": description, "properties": props}


def list_of(item: Schema) -> Schema:
    return {"type": "array", "items": item}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(s: Schema) -> Schema:
    return {"anyOf": [s, {"type": "null"}]}


REPLIES: dict[str, Schema] = {
    "Error": {
        "type": "object", "required": ["error"],
        "description": "Every error reply (see the error responses for codes and statuses).",
        "properties": {"error": {
            "type": "object", "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string", "description": "machine-readable: invalid, "
                         "not_found, exists, conflict, not_manager, ..."},
                "message": {"type": "string", "description": "one line for a human"},
                "field": {"type": "string", "description": "the input at fault (a dotted "
                          "spec path such as task.container.env, a body field, or a route "
                          "parameter); empty if none"}}}},
    },
    "Info": obj("this agent; the cluster fields only when it is a member",
                 hostname=STR, addr=STR, api_port=INT, member=BOOL, node_id=STR,
                 cluster_id=STR, role=STR, is_leader=BOOL, leader=STR, ready=BOOL, term=INT,
                 voters=list_of(STR), index=INT,
                 gossip=nullable({"type": "object"}), locked=BOOL,
                 removed=STR, version=STR, features=list_of(STR)),
    "NodeIds": obj("the node's identity in the cluster", node_id=STR, cluster_id=STR, role=STR),
    "Node": obj("a node (`node ls`; `node inspect` adds details)",
                 id=STR, hostname=STR, addr=STR, role={"enum": ["manager", "worker"]},
                 state={"enum": ["ready", "down", "unknown"]},
                 availability={"enum": ["active", "pause", "drain"]},
                 manager_status={"enum": ["leader", "reachable", "unreachable", ""]},
                 message=STR, tasks=INT, membership=STR, api_port=INT, raft_port=INT,
                 gossip_port=INT,
                 platform=obj("inspect: Docker's Description.Platform (architecture as "
                               "uname -m; empty until the node reported it)", os=STR,
                               architecture=STR),
                 resources=obj("inspect: memory and CPUs the node reports (at join, "
                                "refreshed by its agent when they change), and "
                                "what its live tasks reserve", memory_bytes=INT, cpus=NUM,
                                reserved_memory_bytes=INT, reserved_cpus=NUM,
                                generic_resources={
                                    "type": "object", "description": "generic resources "
                                    "the node advertises: kind → a count or a list of IDs",
                                    "additionalProperties": {"oneOf": [INT, list_of(STR)]}},
                                reserved_generic_resources={
                                    "type": "object", "description": "units its live tasks "
                                    "reserve per kind (lower case)",
                                    "additionalProperties": INT}),
                 labels={"type": "object", "additionalProperties": STR},
                 created_at=TIME, updated_at=TIME, gossip=nullable({"type": "object"})),
    "RoleChange": obj("a promote/demote result", id=STR, hostname=STR, role=STR, changed=BOOL,
                       message=STR, warning=STR),
    "Service": obj("a service (`service ls`; `service inspect` adds spec and "
                    "previous_spec)",
                    id=STR, name=STR, labels={"type": "object", "additionalProperties": STR},
                    mode=STR, replicas=INT, running=INT, max_replicas_per_node=INT,
                    completed=INT, failed=INT, max_concurrent=INT,
                    job_state={"enum": ["running", "completed", "failed"]}, job_message=STR,
                    schedule=obj("a scheduled job's next run, last run and (inspect) its "
                                  "runs", cron=STR, timezone=STR, policy=STR,
                                  next_run=nullable(TIME),
                                  last_run=nullable({"type": "object"}),
                                  runs=list_of({"type": "object"})),
                    autoscale=obj("an autoscaled service's settings and the autoscaler's "
                                   "last decisions (usage, current, desired, reason)",
                                   enabled=BOOL, min=INT, max=INT,
                                   decisions=list_of({"type": "object"})),
                    image=STR, command=list_of(STR), version=INT,
                    vip=STR, ports=list_of({"type": "object"}), created_at=TIME, updated_at=TIME,
                    spec=ref("ServiceSpec"), previous_spec=nullable(ref("ServiceSpec")),
                    health=list_of(obj("a running task with a health check (inspect only)",
                                      task=STR, name=STR, health=STR, failing_streak=INT,
                                      log=list_of({"type": "object"}))),
                    containers=list_of(obj("a running pod's sidecars and init containers "
                                          "(inspect only; items as Task.containers)",
                                          task=STR, name=STR,
                                          containers=list_of({"type": "object"})))),
    "ServiceRef": obj("the service a command acted on", id=STR, name=STR, version=INT,
                       replicas=INT, removed=BOOL, image=STR, warnings=list_of(STR)),
    "Usage": obj("live resource use read from the task's cgroups (bytes through block "
                  "devices: all of them; through the network: every interface of the task's "
                  "own namespace but lo, null for a host-network task), each null where this "
                  "node cannot tell", memory_bytes=INT, memory_peak_bytes=INT, cpu_seconds=NUM,
                  pids=INT, block_read_bytes=nullable(INT), block_write_bytes=nullable(INT),
                  net_rx_bytes=nullable(INT), net_tx_bytes=nullable(INT), read_at=NUM),
    "Task": obj("a task (`service ps`)",
                 id=STR, name=STR, service=STR, service_id=STR, slot=INT, node_id=STR, node=STR,
                 desired_state=STR, state=STR, message=STR, error=STR,
                 exit_code=nullable(INT), pid=nullable(INT), addr=STR,
                 health={"enum": ["", "starting", "healthy", "unhealthy"]},
                 failing_streak=INT,
                 health_log=list_of(obj("one health probe, oldest first (the last 5)",
                                       start=TIME, end=TIME, exit_code=INT, output=STR)),
                 usage=nullable(ref("Usage")), service_version=INT, image=STR,
                 created_at=TIME,
                 updated_at=TIME, state_since=TIME,
                 containers=list_of(obj(
                     "a pod's sidecar or init container (node/pod.py); the main container "
                     "is the task itself", name=STR, kind={"enum": ["sidecar", "init"]},
                     state={"enum": ["waiting", "running", "exited"]}, pid=nullable(INT),
                     exit_code=nullable(INT), restarts=INT,
                     health={"enum": ["", "starting", "healthy", "unhealthy"]},
                     message=STR))),
    "TaskStats": {"allOf": [ref("Task"), obj(
        "what its use is a share of (`shoal stats`): the task's limits, else its node's",
        memory_limit=INT, cpu_limit=NUM)]},
    "LogRecord": obj("one log line (a JSON line of application/x-ndjson)",
                      ts=nullable(NUM), stream={"enum": ["stdout", "stderr"]}, line=STR,
                      task=STR),
    "Event": obj("one change of the cluster (a JSON line of application/x-ndjson, or the "
                  "data of a server-sent event)",
                  cursor=STR, index=INT, time=TIME,
                  type={"enum": ["service", "task", "node", "secret", "config", "gap"]},
                  action=STR, id=STR, name=STR, attributes={"type": "object"}, local=BOOL),
    "Image": obj("an image in the node's store", id=STR, tags=list_of(STR), layers=INT, size=INT),
    "ImageDetail": obj("an image in the node's store, whole (`image inspect`)", id=STR,
                       tags=list_of(STR), layers=list_of(STR), size=INT,
                       config={"type": "object", "description": "Docker's image config "
                               "(Entrypoint, Cmd, Env, WorkingDir, User, Healthcheck...)"}),
    "ObjectMeta": obj("a secret or config (a config adds data, base64; a secret's value is "
                       "never returned)", id=STR, name=STR, labels={"type": "object"},
                       created_at=TIME, updated_at=TIME, data=STR, removed=BOOL),
    "Network": obj("a user-defined network", id=STR, name=STR, driver=STR, scope=STR,
                    subnet=STR, gateway=STR, vni=INT, internal=BOOL, attachable=BOOL,
                    labels={"type": "object"}, created_at=TIME, services=list_of(STR),
                    tasks={"type": "object"}, removed=BOOL),
    "Volume": obj("a named volume (`volume create`; `implicit`: made by a task's mount)",
                   id=STR, name=STR, driver=STR, options={"type": "object"},
                   labels={"type": "object"}, scope=STR, created_at=nullable(TIME),
                   services=list_of(STR), removed=BOOL, implicit=BOOL, nodes=list_of(STR)),
    "CaInfo": obj("the cluster CA and this node's certificate", digest=STR,
                   not_after=nullable(TIME), clients=list_of(STR),
                   node_certificate=nullable(obj(
                       "", node_id=STR, role=STR, serial=STR, not_before=TIME,
                       not_after=TIME, renewals=INT)),
                   autolock=BOOL, rotation=ref("CaRotation")),
    "CaRotation": obj("a CA rotation's progress (`phase` \"\" = none)", phase=STR,
                       digest=STR, next_digest=STR, nodes=INT, trusting=INT, reissued=INT),
    "User": obj("a user (never its password hash or token)", name=STR,
                 role={"enum": ["viewer", "operator", "admin"]}, password=BOOL, token=BOOL,
                 created_at=TIME, updated_at=TIME),
    "ClientCert": obj("a client certificate for the remote API", name=STR, cert=STR,
                       ca_cert=STR, not_after=TIME,
                       user=nullable(STR)),
    "KeyRotation": obj("a finished gossip key rotation (key fingerprints, hostnames)",
                        key=STR, old_keys=list_of(STR), nodes=list_of(STR), skipped=list_of(STR),
                        seconds=NUM),
    "Object": {"type": "object"},
}


__all__ = [
    "BOOL",
    "INT",
    "NUM",
    "REPLIES",
    "STR",
    "TIME",
    "Schema",
    "list_of",
    "nullable",
    "obj",
    "ref",
]
