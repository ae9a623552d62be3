"""The floor the extension is measured against (bench/README.md, "What runs").

A bare ``http.server.ThreadingHTTPServer``: HTTP/1.1 keep-alive, TCP_NODELAY on every
accepted socket, daemon threads, and every GET (``/ping`` included) answered 200 with
one constant body. It does no routing, no token check, no cache and no logging, so it
is the least a server built on ``http.server`` can cost; the extension's figures are
judged as ratios against it.

Usage (the benchmark starts it with the same interpreter flags as the extension):

    python3 -S bench/floor_server.py PORT BODY_SIZE

It listens on 127.0.0.1 and, where the host has it, on ::1 (as the extension does), so
a client that says ``localhost`` pays the same address lookup against both.
Kept to the bare minimum on purpose (no argparse, no logging set-up): its start-up time
is the start-up floor.
"""

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FloorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"{}"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args):
        # The extension runs with LOG_LEVEL=warn and logs nothing per request; a
        # per-request stderr line here would slow the floor and flatter the extension.
        pass


class FloorServer(ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self):
        conn, addr = super().get_request()
        # Without this a keep-alive client waits ~40 ms per request for the delayed
        # ACK of the header segment (docs/pitfalls.md, "Delayed-ACK stall").
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


class FloorServer6(FloorServer):
    address_family = socket.AF_INET6


def constant_body(size):
    """A JSON document of exactly size bytes (at least 2), so JSON-parsing clients work too."""
    if size < 13:
        return b"{" + b" " * max(0, size - 2) + b"}"
    return b'{"Value": "' + b"x" * (size - 13) + b'"}'


def main(argv):
    port = int(argv[1])
    FloorHandler.body = constant_body(int(argv[2]))
    v4 = FloorServer(("127.0.0.1", port), FloorHandler)
    try:
        v6 = FloorServer6(("::1", port), FloorHandler)
    except OSError:  # no IPv6 loopback on this host: serve 127.0.0.1 only
        v6 = None
    if v6 is not None:
        threading.Thread(target=v6.serve_forever, daemon=True).start()
    try:
        v4.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
