"""A stand-alone HTTPS client for security tests: call a node's API as *some* process would.

    python tests/security_probe.py URL [--cert PEM] [--ca PEM] [--hostname NAME]
                                       [--method POST] [--body JSON] [--plain]

Prints one JSON line: ``{"status": N, "body": ...}`` when the server answered, or
``{"error": "..."}`` when the connection or the TLS handshake failed. ``--cert`` is a file
with a certificate and its key (a node's ``tls/node.pem``); without ``--ca`` the server's
certificate is not verified (the probe plays an outsider); ``--plain`` speaks HTTP without
TLS. Run inside a lab host with ``Host.run``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
from urllib.parse import urlsplit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--cert", default="")
    ap.add_argument("--ca", default="")
    ap.add_argument("--hostname", default="")
    ap.add_argument("--method", default="POST")
    ap.add_argument("--body", default="{}")
    ap.add_argument("--plain", action="store_true")
    args = ap.parse_args()
    u = urlsplit(args.url)
    host, port = u.hostname or "", u.port or 2377
    conn: http.client.HTTPConnection
    if args.plain:
        conn = http.client.HTTPConnection(host, port, timeout=5)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if args.ca:
            ctx.load_verify_locations(args.ca)
            ctx.check_hostname = bool(args.hostname)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if args.cert:
            ctx.load_cert_chain(args.cert)
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
        if args.hostname:
            # verify the server as NAME (a role), not as the address we dial
            sock_ctx = ctx

            def connect(c: http.client.HTTPSConnection = conn) -> None:
                http.client.HTTPConnection.connect(c)
                c.sock = sock_ctx.wrap_socket(c.sock, server_hostname=args.hostname)

            conn.connect = connect  # type: ignore[method-assign]
    try:
        body = args.body.encode() if args.method != "GET" else None
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request(args.method, target, body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    finally:
        conn.close()
    try:
        out = json.loads(raw)
    except ValueError:
        out = raw.decode(errors="replace")
    print(json.dumps({"status": resp.status, "body": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
