"""A fake container credentials endpoint that can misbehave (stdlib only).

The protocol is the one of ECS and Lambda SnapStart, as the AWS SDKs implement it: a
``GET`` with the authorization token in ``Authorization``, answered with JSON
``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}`` (Expiration as ISO-8601
UTC). Serves ``http://127.0.0.1:<random port>/creds`` (``url``); point the extension's
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` at it.

Modes (``FakeCredentials(mode=...)`` or ``set_mode(...)`` between requests):

``ok``       200 with credentials valid for 6 hours (access key id ``ASIAFAKECREDS``)
``silent``   reads the request and never answers (until ``close()``)
``drip``     status line and headers at once, then a body padded with spaces to 10,000
             bytes (still valid JSON), at ``rate`` bytes per second (default 10)
``500``      500 with a JSON error body, at once
``badjson``  200 with a body that is not JSON, at once

``count()`` is the number of requests received; ``authorizations`` the
``Authorization`` header of each. Each request is recorded before it is answered, so a
silent endpoint's call is counted at once. ``close()`` wakes silent and dripping
handlers and stops serving (idempotent).
"""

import datetime
import http.server
import json
import threading

MODES = ("ok", "silent", "drip", "500", "badjson")
ACCESS_KEY_ID = "ASIAFAKECREDS"
DRIP_SIZE = 10000


def credentials(key_id=ACCESS_KEY_ID, expires_in=datetime.timedelta(hours=6)):
    """A credentials document as the endpoint serves it."""
    expiration = datetime.datetime.now(datetime.timezone.utc) + expires_in
    return {
        "AccessKeyId": key_id,
        "SecretAccessKey": "secret-of-" + key_id,
        "Token": "session-token-of-" + key_id,
        "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class FakeCredentials:
    """See the module docstring. A context manager, or call ``close()``."""

    def __init__(self, mode="ok", rate=10):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self.mode = mode
        self.rate = rate
        self.authorizations = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with fake._lock:
                    fake.authorizations.append(self.headers.get("Authorization"))
                    mode = fake.mode
                fake._answer(self, mode)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/creds"
        threading.Thread(target=self._server.serve_forever,
                         kwargs={"poll_interval": 0.05}, daemon=True).start()

    def set_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            self.mode = mode

    def count(self):
        with self._lock:
            return len(self.authorizations)

    def close(self):
        self._stop.set()
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _answer(self, h, mode):
        h.close_connection = True
        if mode == "silent":
            self._stop.wait(120)
            return
        if mode == "500":
            self._send(h, 500, b'{"message": "internal error"}')
            return
        if mode == "badjson":
            self._send(h, 200, b"<html>not json</html>")
            return
        body = json.dumps(credentials()).encode()
        if mode == "ok":
            self._send(h, 200, body)
            return
        # drip: the headers promise DRIP_SIZE bytes, which then come rate bytes a second.
        body = body + b" " * (DRIP_SIZE - len(body))
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body))
            step = max(1, self.rate // 10)
            for start in range(0, len(body), step):
                h.wfile.write(body[start:start + step])
                if self._stop.wait(step / float(self.rate)):
                    return
        except OSError:
            return  # the client gave up: what a deadline should make it do

    @staticmethod
    def _send(h, status, body):
        reason = h.responses[status][0].encode()
        try:
            h.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                          % (status, reason, len(body), body))
        except OSError:
            pass
