"""The CLI's client of the agent API: the local unix socket, or a manager's remote API over
mutual TLS.

Owns: sending one request and turning the reply (or a connection failure) into a value or a
``CliError`` naming what went wrong. A plain request over the unix socket (every `ls`, `ps`,
`inspect`) is written and read on a bare socket — a few lines of HTTP/1.1 with
``Connection: close`` — so that a short command does not pay for importing http.client,
email and ssl; TLS and streaming routes use http.client (imported then). That socket is the
C module's (``_socket``, which the ``socket`` module wraps): importing ``socket`` and its
selectors, enum flags and array would cost ~3 ms, a tenth of `shoal service ls`. Must not
touch: output, argument parsing, cluster logic.
"""

from __future__ import annotations

import json
import os
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as _raw_socket
from collections.abc import Iterator

from shoal.cli.errors import CliError

TYPE_CHECKING = False  # (typing's, without importing typing at run time: see cli/main.py)
if TYPE_CHECKING:
    import http.client
    import ssl
    from typing import Any, BinaryIO


def _tls_context(tls_dir: str) -> ssl.SSLContext:
    """Client side of the remote API: DIR/{ca,cert,key}.pem from `shoal ca issue-client`.
    The server must hold a certificate of the same cluster CA (any of its nodes)."""
    import ssl
    from pathlib import Path

    d = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the cluster CA is the trust anchor, not a DNS name
    try:
        ctx.load_verify_locations(str(d / "ca.pem"))
        ctx.load_cert_chain(str(d / "cert.pem"), str(d / "key.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"--tls-dir {tls_dir} must hold ca.pem, cert.pem and key.pem (from "
                       f"`shoal ca issue-client NAME --out DIR`): {exc}") from None
    return ctx


def _dechunk(body: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated chunked body")
        size = int(body[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


class Client:
    def __init__(self, host: str, timeout: float = 60.0, tls_dir: str = "") -> None:
        self.host = host
        self.timeout = timeout
        self.path = ""
        self._tls: ssl.SSLContext | None = None
        self.stale = False  # GETs ask for ?stale=1 (a manager's own copy, not confirmed)
        if host.startswith("unix://"):
            self.path = host[len("unix://"):]
        elif host.startswith("tcp://"):
            addr = host[len("tcp://"):].rstrip("/")
            name, sep, port = addr.rpartition(":")
            if not sep or not (port.isascii() and port.isdigit()):
                raise CliError(f"{host!r}: use tcp://ADDR:PORT (the agent's --remote-api-port)")
            self._addr = (name, int(port))
            if not tls_dir:
                raise CliError("a tcp:// host needs --tls-dir DIR (or SHOAL_TLS_DIR) with a "
                               "client certificate from `shoal ca issue-client`")
            self._tls = _tls_context(tls_dir)
        else:
            raise CliError(f"unsupported host {host!r}: use unix:///path/to/shoal.sock or "
                           "tcp://ADDR:PORT")

    def _connection(self) -> http.client.HTTPConnection:
        import http.client

        if self._tls is None:
            path = self.path

            class _Unix(http.client.HTTPConnection):
                def connect(self) -> None:
                    import socket

                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(self.timeout)
                    s.connect(path)
                    self.sock = s

            return _Unix("localhost", timeout=self.timeout)
        return http.client.HTTPSConnection(self._addr[0], self._addr[1], timeout=self.timeout,
                                           context=self._tls)

    def _unix_request(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        """One request on a fresh unix-socket connection: (status, body)."""
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
        if data is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + (data or b"")
        s = _raw_socket(AF_UNIX, SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(raw)
            chunks = []
            while True:
                got = s.recv(65536)
                if not got:
                    break
                chunks.append(got)
        finally:
            s.close()
        reply = b"".join(chunks)
        header, sep, body = reply.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if not sep or len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionResetError("the agent closed the connection mid-reply")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(b":") for line in lines[1:])}
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = _dechunk(body)
        elif b"content-length" in fields:
            body = body[:int(fields[b"content-length"])]
        return int(parts[1]), body

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if self.stale and method == "GET":
            path += ("&" if "?" in path else "?") + "stale=1"
        data = None if body is None else json.dumps(body).encode()
        try:
            if self._tls is None:
                status, raw = self._unix_request(method, path, data)
            else:
                status, raw = self._tls_request(method, path, data)
        except (FileNotFoundError, ConnectionRefusedError):
            raise CliError(f"cannot connect to the shoal agent at {self.host}: is it running? "
                           "(start it with `shoal agent --advertise-addr IP`)") from None
        except PermissionError:
            raise CliError(f"permission denied on {self.path}: the agent's socket is for "
                           "root only") from None
        except TimeoutError:
            raise CliError(f"the agent at {self.host} did not answer in {self.timeout:g}s") \
                from None
        except ValueError:
            raise CliError(f"the agent at {self.host} sent a malformed reply") from None
        except OSError as exc:
            raise CliError(f"cannot talk to the agent at {self.host}: {exc}") from None
        try:
            out = json.loads(raw) if raw else None
        except ValueError:
            raise CliError(f"the agent sent a malformed reply (HTTP {status})") from None
        if status >= 400:
            err = (out or {}).get("error", {}) if isinstance(out, dict) else {}
            raise CliError(err.get("message") or f"request failed with HTTP {status}",
                           str(err.get("field") or ""))
        return out

    def _tls_request(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        import http.client
        import ssl

        conn = self._connection()
        try:
            headers = {"Content-Type": "application/json"} if data is not None else {}
            if os.environ.get("SHOAL_TOKEN"):  # act as that user (`shoal user token`)
                headers["Authorization"] = f"Bearer {os.environ['SHOAL_TOKEN']}"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except ssl.SSLCertVerificationError as exc:
            raise CliError(f"the server at {self.host} is not a node of the cluster in "
                           f"--tls-dir: {exc.verify_message}") from None
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected):
            raise CliError(f"the agent at {self.host} refused the TLS connection: is its "
                           "remote API on, and the client certificate this cluster's and "
                           "not expired?") from None
        finally:
            conn.close()

    def download(self, path: str, body: Any, out: BinaryIO) -> int:
        """POST ``body`` (JSON) to a route that answers with a byte stream, written to ``out``
        as it arrives; the bytes written. CliError for an error reply, and for a stream the
        agent cut before its end (then ``out`` holds only part of it)."""
        import http.client

        conn = self._connection()
        conn.timeout = self.timeout  # (per read: the agent reads every layer before it answers)
        written = 0
        try:
            resp = self._open(conn, "POST", path, json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
            while True:
                try:
                    chunk = resp.read(1 << 20)
                except (http.client.IncompleteRead, OSError) as exc:
                    raise CliError(f"the agent stopped sending after {written} bytes ({exc}): "
                                   "the output is incomplete (its log says why)") from None
                if not chunk:
                    return written
                try:
                    out.write(chunk)
                except OSError as exc:  # (a full disk, a reader that left: ours, not the agent's)
                    raise CliError(f"cannot write the output after {written} bytes: "
                                   f"{exc.strerror or exc}") from None
                written += len(chunk)
        finally:
            conn.close()

    def _open(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: Any, headers: dict[str, str]) -> http.client.HTTPResponse:
        """Send a request on ``conn``; the response, once it says success. CliError for a
        connection that fails or an error reply (its message and field)."""
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            raise CliError(f"cannot connect to the shoal agent at {self.host}: is it "
                           "running?") from None
        except OSError as exc:
            raise CliError(f"cannot talk to the agent at {self.host}: {exc}") from None
        if resp.status >= 400:
            try:
                err = json.loads(resp.read()).get("error", {})
            except ValueError:
                err = {}
            raise CliError(err.get("message") or f"request failed with HTTP {resp.status}",
                           str(err.get("field") or ""))
        return resp

    def stream(self, path: str, method: str = "GET", body: BinaryIO | None = None,
               headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Call a streaming JSON-lines route; yields records as they arrive. ``body``: an open
        file sent as it is read (with its Content-Length in ``headers``)."""
        conn = self._connection()
        conn.timeout = None
        try:
            resp = self._open(conn, method, path, body, headers or {})
            for raw in resp:
                if raw.strip():
                    yield json.loads(raw)
        finally:
            conn.close()
