"""The request bodies of the API's routes (shoal.node.openapi's ``ROUTES``): small msgspec
Structs declaring what each handler reads, whose JSON Schemas become the OpenAPI document's
request components.

Owns: the body declarations (``BODIES``) — field names, types, bounds and help. The service
spec in a body is ``shoal.raft.spec.ServiceSpec`` itself. Must not touch: routes, handlers
(shoal.node.api, shoal.node.control), I/O.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import msgspec

from shoal.raft.spec import OBJECT_NAME_RE, ServiceMode, ServiceSpec


def _d(help: str, **bounds: Any) -> msgspec.Meta:
    return msgspec.Meta(description=help, **bounds)


# the scale route takes the spec's own declaration of replicas (bounds and help)
_REPLICAS_META = typing.get_args(
    typing.get_type_hints(ServiceMode, include_extras=True)["replicas"])[1]
Role = Literal["manager", "worker"]
Unset = msgspec.UnsetType


class _Body(msgspec.Struct, kw_only=True):
    """Base of the request bodies: what the handlers read (unknown fields are ignored)."""


# --------------------------------------------------------------------------- user bodies

class InitRequest(_Body):
    cluster_cidr: Annotated[str, _d("the task network's CIDR (e.g. 10.99.0.0/16); empty = "
                                    "the default")] = ""
    default_addr_pool: Annotated[str, _d("the pool user-defined networks take their /24 "
                                         "subnets from; empty = 10.96.0.0/15")] = ""


class JoinRequest(_Body):
    token: Annotated[str, _d("a join token from `shoal join-token worker|manager`",
                             min_length=1)]
    remote: Annotated[str, _d("a manager's API address ADDR:PORT", min_length=1)]


class LeaveRequest(_Body):
    force: Annotated[bool, _d("leave even if this is a manager the cluster needs")] = False


class NodeUpdateRequest(_Body):
    availability: Annotated[Literal["active", "pause", "drain"] | Unset, _d(
        "active: takes tasks; pause: keeps its tasks, takes no new ones; drain: its tasks "
        "move elsewhere")] = msgspec.UNSET
    label_add: Annotated[dict[str, str], _d("node labels to set (placement constraints "
                                            "node.labels.KEY)")] = {}
    label_rm: Annotated[list[str], _d("node labels to remove")] = []
    generic_resource_add: Annotated[list[str], _d(
        "generic resources to advertise, KIND=VALUE (Swarm's): VALUE all digits sets the "
        "kind's count (discrete), else adds one named ID of the kind (GPU=UUID1); needs "
        "cluster schema 10")] = []
    generic_resource_rm: Annotated[list[str], _d(
        "generic resources to take away: KIND (the whole kind) or KIND=ID (one named ID); "
        "tasks already running keep theirs")] = []
    role: Annotated[Role | Unset, _d("promote/demote the node (as the promote and demote "
                                     "routes do)")] = msgspec.UNSET


ResolveImage = Literal["always", "changed", "never"]
_RESOLVE = _d("pin the image's tag to the registry's digest now (Swarm's --resolve-image): "
              "always; changed = only an image given without a digest; never. Only for "
              "images that name their registry. Default: always on create, changed on update")


class ServiceCreateRequest(_Body):
    spec: ServiceSpec
    resolve_image: Annotated[ResolveImage | None, _RESOLVE] = None


class ServiceScaleRequest(_Body):
    replicas: Annotated[int, _REPLICAS_META]
    version: Annotated[int | None, _d(
        "the service version the replica count was read at: refused (409 conflict) if the "
        "service changed since (compare-and-set); null = no check")] = None


class ServiceUpdateRequest(_Body):
    spec: Annotated[ServiceSpec, _d("the whole new spec (not a patch)")]
    version: Annotated[int | None, _d(
        "the service version the spec was read at: refused (409 conflict) if the service "
        "changed since; null = no check")] = None
    resolve_image: Annotated[ResolveImage | None, _RESOLVE] = None


class RegistryLoginRequest(_Body):
    server: Annotated[str, _d("the registry, HOST[:PORT] as in image references")]
    username: str
    password: Annotated[str, _d("checked against the registry, then kept sealed as the "
                                "cluster secret registry-auth.HOST; never shown again")]


class ImagePullRequest(_Body):
    ref: Annotated[str, _d("image reference naming its registry, "
                           "HOST[:PORT]/PATH[:TAG][@sha256:DIGEST]")]


class ImageTagRequest(_Body):
    source: Annotated[str, _d("the image: NAME[:TAG], an id or a unique id prefix")]
    target: Annotated[str, _d("the new tag, NAME[:TAG] (a registry's HOST[:PORT]/PATH[:TAG] "
                              "to push there)")]


class ImagePushRequest(_Body):
    ref: Annotated[str, _d("the image: NAME[:TAG], an id or a unique id prefix")]
    target: Annotated[str, _d("where to push it, HOST[:PORT]/PATH[:TAG]; \"\" = ref itself, "
                              "which then names its registry")] = ""


class ImageSaveRequest(_Body):
    refs: Annotated[list[str], _d("the images: NAME[:TAG], ids or unique id prefixes",
                                  min_length=1)]


class ImagePruneRequest(_Body):
    all: Annotated[bool, _d("every image no task here uses, not only the ones without a "
                            "name:tag (`image prune -a`)")] = False
    until: Annotated[float | None, _d("only images unused for at least this many seconds "
                                      "(`--filter until=DURATION`)", ge=0)] = None


class BuilderPruneRequest(_Body):
    all: Annotated[bool, _d("every build-cache record no running build uses, not only the "
                            "dangling ones (`builder prune -a`)")] = False
    filters: Annotated[list[str], _d("`until=DURATION|TIMESTAMP` (only records last used "
                                     "before), `id=PREFIX` (only those records, or the cache "
                                     "mount of that id)")] = []
    keep_storage: Annotated[int, _d("bytes of build cache to keep: the least recently used "
                                    "records go until the cache is no bigger; 0: no bound",
                                    ge=0)] = 0


class ImageLoadRequest(_Body):
    path: Annotated[str, _d("absolute path, on the node, of an image tarball (docker save / "
                            "OCI archive), or of a rootfs tarball with `ref`", pattern="^/")]
    ref: Annotated[str, _d("import the tarball as a plain rootfs image named NAME[:TAG]; "
                           "empty = load an image archive")] = ""


class ObjectCreateRequest(_Body):
    name: Annotated[str, _d("1-64 letters, digits, '.', '_', '-'",
                            pattern=OBJECT_NAME_RE.pattern)]
    data: Annotated[str, _d("the value, base64-encoded (at most 500 KiB decoded)",
                            extra_json_schema={"contentEncoding": "base64"})]
    labels: Annotated[dict[str, str], _d("labels")] = {}


class NetworkCreateRequest(_Body):
    name: Annotated[str, _d("1-63 letters, digits, '.', '_', '-'")]
    driver: Annotated[Literal["overlay"], _d("overlay: VXLAN across every node")] = "overlay"
    subnet: Annotated[str, _d("CIDR; empty = the next /24 of the default address pool")] = ""
    gateway: Annotated[str, _d("gateway address in the subnet; empty = its first")] = ""
    internal: Annotated[bool, _d("no route out of the network")] = False
    attachable: Annotated[bool, _d("recorded (Swarm parity)")] = False
    labels: Annotated[dict[str, str], _d("labels")] = {}


class VolumeCreateRequest(_Body):
    name: Annotated[str, _d("lower-case letters, digits, '-', '_'")]
    driver: Annotated[Literal["local", "sshfs"], _d(
        "local: a directory per node, or mount(2) with type/o/device (NFS); sshfs: FUSE over "
        "ssh (shoal.runtime.volumes)")] = "local"
    options: Annotated[dict[str, str], _d(
        "the driver's options (Docker's volume-opt), e.g. sshcmd, port, IdentityFile-secret, "
        "type, o, device, single-writer")] = {}
    labels: Annotated[dict[str, str], _d("labels")] = {}


class IssueClientRequest(_Body):
    name: Annotated[str, _d("client name: 1-64 letters, digits, '.', '_' or '-' (an older "
                            "certificate of that name is revoked)")]
    csr: Annotated[str, _d("PEM certificate signing request of the client's key")]
    lifetime: Annotated[float | None, _d("certificate lifetime in seconds (60 s to 10 "
                                         "years); null = the default")] = None
    user: Annotated[str, _d("issue it for this user (`shoal user add`): requests with it act "
                            "with that user's current role; empty = an admin's "
                            "certificate")] = ""


class UserAddRequest(_Body):
    name: Annotated[str, _d("user name: 1-64 letters, digits, '.', '_' or '-'")]
    role: Annotated[Literal["viewer", "operator", "admin"], _d("what the user may do")]
    password: Annotated[str, _d("8-1024 characters; stored only as a sealed scrypt hash",
                                min_length=8, max_length=1024)]


class UserUpdateRequest(_Body):
    role: Annotated[Literal["viewer", "operator", "admin"] | None,
                    _d("the new role (applies to the next request)")] = None
    password: Annotated[str | None, _d("the new password (8-1024 characters)")] = None


class MqttSetRequest(_Body):
    url: Annotated[str, _d("the broker: mqtt[s]://[USER@]HOST[:PORT], no password")]
    password: Annotated[str | None, _d("USER's password (sealed in Raft); null = keep the "
                                       "one set (same user), \"\" = none")] = None
    topic_prefix: Annotated[str, _d("topic prefix; empty = shoal/CLUSTER")] = ""
    ca: Annotated[str | None, _d("PEM of the broker's CA; null = keep (mqtts)")] = None
    client_cert: Annotated[str | None, _d("PEM client certificate; null = keep")] = None
    client_key: Annotated[str | None, _d("PEM key of client_cert (sealed in Raft)")] = None
    commands: Annotated[bool, _d("accept signed scale commands (a command key is made)")] = \
        False
    rotate_command_key: Annotated[bool, _d("make a new command key")] = False


class SwarmUpdateRequest(_Body):
    autolock: Annotated[bool | None, _d("true: encrypt the managers' keys at rest under a new "
                                        "unlock key (shown once); false: store them in the "
                                        "clear; null: unchanged")] = None
    task_history_limit: Annotated[int | None, _d(
        "dead tasks kept per slot, 0 to 1000 (Swarm's TaskHistoryRetentionLimit; needs "
        "cluster schema 8); null: unchanged")] = None


class UnlockRequest(_Body):
    key: Annotated[str, _d("the unlock key, SHOALKEY-1-...")]


class CaRotateRequest(_Body):
    cert_expiry: Annotated[float | None, _d("lifetime of the certificates issued from now on, "
                                            "seconds (60 s to 20 years); null = unchanged")
                           ] = None


class CaAckRequest(_Body):
    stage: Annotated[int, _d("1: the node trusts both roots; 2: it holds a new-root "
                             "certificate")]
    digest: Annotated[str, _d("the new root's digest")]


# --------------------------------------------------------------------------- peer bodies

class AdmissionRequest(_Body):
    token: Annotated[str, _d("the join token")]
    node: Annotated[dict[str, Any], _d("the joining node: hostname, addr, api_port, "
                                       "raft_port, gossip_port, memory_bytes, cpus, ...")]
    csr: Annotated[str, _d("PEM certificate signing request of the node's key")]


class RenewRequest(_Body):
    csr: Annotated[str, _d("PEM certificate signing request")]


class NodeRoleRequest(_Body):
    node_id: Annotated[str, _d("the node to promote or demote")]
    role: Role


class RoleChangedRequest(_Body):
    role: Role


class GossipKeyRequest(_Body):
    op: Literal["install", "use", "retire", "uninstall"]
    key: Annotated[str, _d("the gossip key, hex")]


class TaskFilesRequest(_Body):
    task_id: str


class StateRequest(_Body):
    after: Annotated[int, _d("the last index the worker applied; -1 = send the whole state",
                             ge=-1)]
    wait: Annotated[float, _d("hold the request open up to this long for a new command",
                              ge=0, le=60)] = 0


class ReportRequest(_Body):
    cmd: Annotated[dict[str, Any], _d("a state-machine command: task_status of the caller's "
                                      "tasks, or node_remove of the caller")]


class HeartbeatRequest(_Body):
    node_id: Annotated[str, _d("the caller's own node id")]


class ImageResolveRequest(_Body):
    ref: Annotated[str, _d("image NAME[:TAG] or id")]


class TaskLogsRequest(_Body):
    task_id: str
    tail: Annotated[int | None, _d("only the last N lines; null = all")] = None
    since: Annotated[float | None, _d("only lines after this Unix time")] = None
    timestamps: bool = False
    follow: Annotated[bool, _d("keep the stream open for new lines")] = False


class TaskUsageRequest(_Body):
    task_ids: Annotated[list[str], _d("tasks running on the answering node (at most 10000 "
                                      "are read)")]


BODIES: tuple[type[msgspec.Struct], ...] = (
    InitRequest, JoinRequest, LeaveRequest, NodeUpdateRequest, ServiceCreateRequest,
    ServiceScaleRequest, ServiceUpdateRequest, ImageLoadRequest, ObjectCreateRequest,
    NetworkCreateRequest, IssueClientRequest, AdmissionRequest, RenewRequest, NodeRoleRequest,
    RoleChangedRequest, GossipKeyRequest, TaskFilesRequest, StateRequest, ReportRequest,
    HeartbeatRequest, ImageResolveRequest, TaskLogsRequest, TaskUsageRequest,
    SwarmUpdateRequest, UnlockRequest, CaRotateRequest, CaAckRequest, BuilderPruneRequest)


__all__ = [
    "BODIES", "AdmissionRequest", "BuilderPruneRequest", "CaAckRequest", "CaRotateRequest",
    "GossipKeyRequest",
    "HeartbeatRequest", "ImageLoadRequest", "ImagePruneRequest", "ImagePullRequest",
    "ImagePushRequest", "ImageResolveRequest", "ImageTagRequest", "InitRequest",
    "IssueClientRequest", "JoinRequest", "LeaveRequest",
    "MqttSetRequest", "NetworkCreateRequest", "NodeRoleRequest", "NodeUpdateRequest",
    "ObjectCreateRequest", "RegistryLoginRequest", "RenewRequest", "ReportRequest",
    "ResolveImage", "Role", "RoleChangedRequest", "ServiceCreateRequest",
    "ServiceScaleRequest", "ServiceUpdateRequest", "StateRequest", "SwarmUpdateRequest",
    "TaskFilesRequest", "TaskLogsRequest", "TaskUsageRequest", "UnlockRequest", "Unset",
    "UserAddRequest", "UserUpdateRequest", "VolumeCreateRequest"]
