"""Rotating the managers' sealing key (`swarm rotate-key`) and autolock's API on one manager
over the in-memory store (node/keys.py): what is sealed is re-sealed, the old key opens
nothing new, a secret sealed under the old key is refused, a locked node answers `locked`."""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_openapi import make_server

from shoal.node import pki, sealing
from shoal.node.errors import ApiError, BadRequest, Conflict, SealError
from shoal.node.keys import KeyManager
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.raft.errors import CommandRejected
from shoal.raft.schema import SCHEMA


async def _manager(tmp_path: Path) -> tuple[Security, SecretsApi, KeyManager, bytes]:
    server, store, ctx = make_server(tmp_path)
    assert ctx.identity is not None
    mk = sealing.new_key()
    ctx.use(replace(ctx.identity, manager_key=mk), store, store)
    sec: Security = server.c.security
    ca_pem, ca_key = pki.create_ca("c1", time.time())
    await store.propose({"op": "cluster_init", "cluster_id": "c1", "now": time.time(),
                         "worker_secret": sec.seal_token_secret("worker", "w" * 32),
                         "manager_secret": sec.seal_token_secret("manager", "m" * 32),
                         "digest": pki.ca_digest(ca_pem), "schema": SCHEMA})
    await store.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                         "ca_key": sealing.seal(mk, ca_key, sealing.AAD_CA_KEY)})
    return sec, server.c.secrets, sec.keys, mk


async def test_rotating_the_managers_key_reseals_everything(tmp_path: Path) -> None:
    sec, secrets, keys, old = await _manager(tmp_path)
    await secrets.create("secret", {"name": "db", "data": base64.b64encode(b"pw").decode()})
    unlock = (await keys.update(True))["unlock_key"]
    store = sec.ctx.require_manager()
    before = store.snapshot()
    r = await keys.rotate_managers_key()
    assert r["secrets"] == 1 and r["key_id"] == sealing.key_id(sec.manager_key())
    new = sec.manager_key()
    assert new != old
    after = store.snapshot()
    c = after.cluster
    # everything sealed opens with the new key only
    for key, works in ((new, True), (old, False)):
        for blob, aad in ((c.ca_key, sealing.AAD_CA_KEY),
                          (next(iter(after.secrets.values())).data,
                           sealing.secret_aad(next(iter(after.secrets))))):
            if works:
                sealing.unseal(key, blob, aad)
            else:
                with pytest.raises(SealError):
                    sealing.unseal(key, blob, aad)
        for text, aad in ((c.worker_secret, sealing.token_aad("worker")),
                          (c.unlock_key, sealing.AAD_UNLOCK_KEY)):
            if works:
                sealing.unseal_text(key, text, aad)
            else:
                with pytest.raises(SealError):
                    sealing.unseal_text(key, text, aad)
    assert sec.token_secrets(after) == ("w" * 32, "m" * 32)
    assert (await keys.unlock_key(False))["unlock_key"] == unlock
    assert before.cluster.ca_key != c.ca_key
    # the CA still signs (its key re-sealed, not replaced)
    assert sec.ca(after).digest == pki.ca_digest(c.ca_cert)
    # a secret sealed by a manager still holding the old key is refused, not stored
    with pytest.raises(CommandRejected, match="rotated while this secret was sealed"):
        await store.propose({"op": "secret_create", "id": "f" * 20, "name": "late",
                             "data": sealing.seal(old, b"x", sealing.secret_aad("f" * 20)),
                             "labels": {}, "now": time.time(), "key_id": sealing.key_id(old)})
    await secrets.create("secret", {"name": "ok", "data": base64.b64encode(b"y").decode()})
    assert {s.name for s in store.snapshot().secrets.values()} == {"db", "ok"}


async def test_a_stale_rotation_is_refused(tmp_path: Path) -> None:
    sec, _secrets, keys, _ = await _manager(tmp_path)
    store = sec.ctx.require_manager()
    await keys.rotate_managers_key()
    with pytest.raises(CommandRejected, match="changed meanwhile"):
        await store.propose({"op": "manager_key_rotate", "old_key_id": "", "key_id": "0" * 16,
                             "ca_key": b"", "ca_next_key": b"", "worker_secret": "",
                             "manager_secret": "", "unlock_key": "", "secrets": {}})


async def test_unlock_api_on_a_node_that_is_not_locked_and_bad_keys(tmp_path: Path) -> None:
    _sec, _, keys, _ = await _manager(tmp_path)
    with pytest.raises(Conflict):
        await keys.unlock(sealing.new_unlock_key())
    with pytest.raises(Conflict, match="autolock is off"):
        await keys.unlock_key(False)
    with pytest.raises(BadRequest):
        await keys.update("yes")
    with pytest.raises(BadRequest):
        await keys.rotate_ca(1)  # below the 60 s floor
    assert (await keys.update(False))["autolock"] is False  # already off: nothing to do


async def test_a_locked_node_refuses_a_wrong_key_and_starts_with_the_right_one(
        tmp_path: Path) -> None:
    sec, _, keys, mk = await _manager(tmp_path)
    ident = sec.ctx.identity
    assert ident is not None
    unlock = sealing.new_unlock_key()
    ident = replace(ident, raft_password="r" * 20)
    ident.key_wrap = sealing.wrap_keys(unlock, ident.node_id, {
        "raft_password": "r" * 20, "manager_key": mk.hex(), "tls_password": ""})
    started: list[str] = []
    locked = replace(ident, raft_password="", manager_key=b"")
    assert KeyManager.is_locked(locked)
    keys.hold(locked, lambda i: started.append(i.raft_password))
    for bad in (sealing.new_unlock_key(), "SWMKEY-1-x", ""):
        with pytest.raises(ApiError):
            await keys.unlock(bad)
    assert started == [] and keys.locked is locked
    out = await keys.unlock(unlock)
    assert out["unlocked"] and started == ["r" * 20] and keys.locked is None
    assert locked.manager_key == mk
