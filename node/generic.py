"""The worker's side of generic resources: which of its node's named IDs a starting task
gets, and the ``DOCKER_RESOURCE_<KIND>`` variables that tell the task.

Owns: ``claim`` (a pure function: the node's resources, the task's reservation and the
environments of the tasks that hold IDs now → the task's variables; a StartError, the task
failing to start saying which kind, when too few are free: the scheduler counted otherwise,
so the node's resources changed since) and ``Claims``, the worker's bookkeeping of what
its starts in flight took (and the wait for IDs a task still stopping holds: the leader no
longer counts a task it orphaned). Must not touch:
the scheduler's counting (shoal.node.scheduler: it places a task only where enough units
are free, so a start finds enough), the store, the runtime (the worker passes in what it
read from it).

Swarm's leader picks the IDs when it assigns a task (``AssignedGenericResources``); shoal's
worker picks them when it starts the task, among its node's IDs that no other live task
of the node holds. What a task holds is read back from the environment it was started
with (the runtime keeps a task's config, an adopted task's too: ``Controller.task_env``),
so the choice survives an agent restart with tasks still running, with nothing more
stored. A discrete kind's variable is the count reserved (Swarm's ``DOCKER_RESOURCE_SSD=2``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from shoal.node.errors import TaskInputUnavailable
from shoal.raft import generic
from shoal.runtime.errors import StartError


def claim(res: Mapping[str, int | list[str]], need: Mapping[str, int],
          held: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The variables of a task reserving ``need`` (kind → count) on a node advertising
    ``res``; ``held``: the environments of the node's other live tasks (their
    ``DOCKER_RESOURCE_*`` name the IDs they hold). Named IDs are taken in the node's order.
    StartError when the node lacks the kind or too few of its IDs are free."""
    env: dict[str, str] = {}
    others = list(held)
    for kind, n in need.items():
        have = generic.find(res, kind)
        if have is None:
            raise StartError(f"generic resource {kind}: this node advertises none (`shoal "
                             f"node update --generic-resource-add {kind}=...`)")
        value = res[have]
        if isinstance(value, int):
            env[generic.env_name(kind)] = str(n)
            continue
        taken = {i for e in others for i in generic.held_ids(e, kind)}
        free = [i for i in value if i not in taken]
        if len(free) < n:
            raise StartError(f"generic resource {kind}: the task needs {n}, {len(free)} of "
                             f"the node's {len(value)} IDs are free")
        env[generic.env_name(kind)] = ",".join(free[:n])
    return env


class Claims:
    """The variables given to the worker's starts in flight (task id → its variables):
    held until the runtime knows the task (then its environment says it), so two
    concurrent starts never take the same ID."""

    def __init__(self) -> None:
        self.starting: dict[str, dict[str, str]] = {}

    def take(self, task_id: str, res: Mapping[str, int | list[str]], need: Mapping[str, int],
             running: Iterable[Mapping[str, str]],
             stopping: Iterable[Mapping[str, str]] = (),
             leaving: Collection[str] = ()) -> dict[str, str]:
        """``claim`` for a starting task, counting the other starts' claims; kept until
        ``release``. Call it with no ``await`` between reading ``running`` and here.
        ``stopping``: the environments of tasks still running here that are on their way
        out (the leader counts them ended: orphaned while their node was cut off, removed),
        ``leaving``: the ids of starts in flight likewise: what they hold is not free yet,
        but will be — TaskInputUnavailable (the start waits, PREPARING, and is tried again)
        rather than the StartError that rejects the task."""
        others = [env for tid, env in self.starting.items()
                  if tid != task_id and tid not in leaving]
        going = [*stopping, *(env for tid, env in self.starting.items()
                              if tid != task_id and tid in leaving)]
        try:
            env = claim(res, need, [*running, *others, *going])
        except StartError as exc:
            if not going:
                raise
            try:
                claim(res, need, [*running, *others])
            except StartError:
                raise exc from None
            raise TaskInputUnavailable(f"{exc}: a task still stopping here holds "
                                       "them") from None
        self.starting[task_id] = env
        return env

    def release(self, task_id: str) -> None:
        self.starting.pop(task_id, None)
