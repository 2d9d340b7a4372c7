"""shoal.lb: the routing-mesh data path (a userspace L4 load balancer, one per node).

Owns: the node's published ports and VIP listeners, and every connection/flow through them.
Must not touch: the cluster state, tasks, or the agent's loop beyond a few control messages --
the agent feeds it tables (``set_service``), it never reads the cluster itself.

Use (in the agent)::

    lb = Balancer(Config(listen_addrs=("0.0.0.0",)))
    await lb.start()
    await lb.set_service(ServiceLB(
        name="web", target_port=8000,
        frontends=(Frontend(8080, Proto.TCP),),
        endpoints=(Endpoint("10.0.1.5", task_id="t1"),
                   Endpoint("10.0.1.6", task_id="t2", drain_deadline=time.time() + 10)),
        vip=None, algorithm=Algorithm.ROUND_ROBIN))
    await lb.remove_service("web")
    print(await lb.stats())
    await lb.close()

Modules: ``client`` (Balancer, in the agent) · ``worker`` + ``proxy`` + ``table`` (the worker
process, ``python -m shoal.lb``) · ``model`` (tables) · ``wire`` + ``channel`` (control
protocol) · ``config`` · ``errors``.
"""

from .client import Balancer, EndpointStats, ServiceStats, Stats, WorkerStats
from .config import Config
from .errors import (
    AddressNotAvailable,
    BalancerUnavailable,
    ConfigError,
    DropReason,
    FrontendError,
    InvalidService,
    LBError,
    PortConflict,
    PortInUse,
    PortPermissionDenied,
    ProtocolError,
    WireError,
)
from .model import Algorithm, Endpoint, Frontend, Proto, ServiceLB

__all__ = [
    "AddressNotAvailable", "Algorithm", "Balancer", "BalancerUnavailable", "Config",
    "ConfigError", "DropReason", "Endpoint", "EndpointStats", "Frontend", "FrontendError",
    "InvalidService", "LBError", "PortConflict", "PortInUse", "PortPermissionDenied", "Proto",
    "ProtocolError", "ServiceLB", "ServiceStats", "Stats", "WireError", "WorkerStats",
]
