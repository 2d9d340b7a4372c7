"""The agent's event-loop exception handler (shoal.node.agent.quiet_closed_tls): uvloop's
"Fatal error on SSL protocol" for a connection its peer already closed is not an error
(uvloop issue #506); every other unhandled exception is still logged at ERROR."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.node.agent import quiet_closed_tls

CLOSED = RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False "
                      "0x560b58428000>; the handler is closed")


def test_a_tls_connection_closed_by_its_peer_is_not_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.DEBUG):
            quiet_closed_tls(loop, {"message": "Fatal error on SSL protocol",
                                    "exception": CLOSED})
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("already closed by its peer" in r.getMessage() for r in caplog.records)
        caplog.clear()
        for context in ({"message": "Fatal error on SSL protocol",
                         "exception": RuntimeError("something else")},
                        {"message": "Task exception was never retrieved",
                         "exception": CLOSED}):
            quiet_closed_tls(loop, context)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == ["Fatal error on SSL protocol",
                                                    "Task exception was never retrieved"]
    finally:
        loop.close()
