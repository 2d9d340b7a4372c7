"""The node's commands, one module per family (swarmkit's controlapi/*.go).

Owns nothing itself. Its modules:

* ``services`` — `service create/update/scale/rollback/rm/ls/inspect/ps/logs`;
* ``nodes`` — `node ls/inspect/update/rm`;
* ``roles`` — promote/demote on the leader, and the quorum rule (a pure function);
* ``admission`` — joins (the manager side), join tokens, the keys members fetch,
  certificate renewal;
* ``dispatcher`` — the workers' state feed server, worker reports, heartbeats.

Each receives the node's narrow context (shoal.node.context.NodeContext: identity, config,
the state source, ``propose``, ``require_manager``) and the few components it calls, never
the agent. Must not touch: the agent module (nothing under node/ imports it), HTTP (routes
live in shoal.node.api), this node's own lifecycle (init/join/leave, role switch: the agent).
"""
