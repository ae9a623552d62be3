"""A small scriptable fake of the two AWS JSON-1.1 operations the extension calls.

Stdlib only. Serves ``AmazonSSM.GetParameter`` and ``secretsmanager.GetSecretValue`` (and
``AmazonSSM.GetParameters``, which prefetch uses: each name as GetParameter answers it,
one behaviour for the call, taken as for its first name, counted once per name)
on ``http://127.0.0.1:<random port>`` with the wire JSON AWS itself sends (not the
SDK shape the extension must produce): timestamps are epoch seconds written the way
AWS's Java services write them (``1.668586960362E9``), absent fields are omitted.

Fault injection is what moto cannot do. Every call consumes one *behaviour*: first
from the queue of the name it asks for (``script(..., name=...)``), else from the
global queue (``script(...)``), else the name's default, else the global default
(``"ok"``). A behaviour is a kind, optionally with a delay applied before it:

    fake.script("throttling", "ok")                 # one fault, then success
    fake.script(Do("ok", delay_ms=300))             # slow success
    fake.set_default("500")                         # every later call fails
    fake.set_default(Do("ok", delay_ms=2000), name="slow")

Kinds (``KINDS``): ``ok``, ``delay`` (= ok after ``delay_ms``), ``500``, ``503``,
``throttling`` (400 ThrottlingException), ``toomany`` (400 TooManyRequestsException),
``429`` (HTTP 429 whose body has no ``__type``, as a proxy or gateway sends it),
``notfound`` (400 ParameterNotFound / ResourceNotFoundException, by service),
``accessdenied`` (400 AccessDeniedException), ``validation`` (400 ValidationException),
``reset`` (reads the request, then closes with SO_LINGER 0: the client sees
ECONNRESET), ``midbody`` (sends the status line and headers with a Content-Length
larger than the body it then sends, and closes), ``hang`` (reads the request and
never answers until ``close()``).

Hostile kinds (keyword parameters after the kind; a hostile or broken peer, see
docs/pitfalls.md "What a hostile or broken peer does"):

``Do("drip", rate=10, size=None)``
    Status line and headers (with the full Content-Length) at once, then the body at
    ``rate`` bytes per second. The body is the ``ok`` answer, padded with trailing
    spaces (still valid JSON) to ``size`` bytes when given: ``size=10**6`` at 10 B/s
    drips "for ever". Stops when the client goes away or the fake closes.
``Do("early_hints", gap=0.2)``
    ``HTTP/1.1 103 Early Hints`` (with a ``Link`` header), then ``gap`` seconds later
    the real 200 ``ok`` answer on the same connection, which stays open. The gap
    matters: written together, a client's read buffer may swallow the 200 with the 103
    and hide the desynchronisation a reused connection then suffers.
``Do("big", size=N, framing="length")``
    A 200 whose body is the ``ok`` answer padded with spaces to exactly ``size`` bytes,
    streamed in 64 KiB pieces (never built in memory), framed by ``framing``:
    ``"length"`` (declared Content-Length), ``"chunked"`` (Transfer-Encoding: chunked)
    or ``"close"`` (no length: the body ends when the fake closes the connection).
``Do("payload", body=..., status=200)``
    Any answer: ``body`` is raw ``bytes`` (sent as is: garbage, ``b"[" * 100000``),
    any JSON-able object, or a callable ``f(ok)`` that receives the parsed ``ok``
    answer (a dict) and returns bytes or a JSON-able object (wrong shapes, another
    name). Content-Type is AWS's; no ``x-amzn-ErrorType`` header, so that an error
    body has to speak for itself.
``Do("raw", data=..., gap=0.2)``
    Writes ``data`` as the whole answer, status line included: bytes, a callable
    ``f(ok_bytes)`` returning bytes, or a list of those written ``gap`` seconds apart
    (so that a client has parsed the first piece before the next arrives). The
    connection stays open for the next request (``close=True`` closes it).
    ``http_response(status, body, headers)`` builds such bytes: an answer followed by
    another one, a 204 carrying a body...

For the streaming kinds each entry of ``requests`` also gets ``sent`` (body bytes the
fake managed to write) and ``complete`` (the whole body was written) once done;
``wait_done(n)`` waits until ``n`` calls have finished answering.

Calls are counted thread-safely by X-Amz-Target and by the raw name asked for
(``Name`` / ``SecretId`` as sent, selector included): ``calls(target=None,
name=None)``. ``requests`` keeps every call (target, name, parsed body, headers, the
behaviour applied, the client's port: one per connection); ``requests_for(name)``
those of one name; ``ok_answer(name)`` is the body an ``ok`` call for ``name`` gets.

Values: any name is answered with a generated value (``"value-of-<name>"``) unless
``set_value`` / ``set_secret`` gave one; setting a new value bumps the version, as
AWS does. A secret asked for by ARN is answered as AWS does: a full ARN (ending in
``-`` and 6 characters) comes back as the ``ARN``, a partial ARN (no suffix) gets the
suffix ``-AbCdEf``; ``Name`` is the name in either.

Where the wire shapes come from: the AWS API references of SSM ``GetParameter`` and
Secrets Manager ``GetSecretValue`` (response syntax) and the JSON-1.1 error format
(``{"__type": ..., "message": ...}`` with ``x-amzn-ErrorType``). Secrets Manager and
SSM's AccessDeniedException spell the message key ``Message``; the extension must
normalise it (README.md: "normalised to that shape when AWS sent ... another
casing").
"""

import base64
import http.server
import json
import re
import socket
import struct
import threading
import uuid
from collections import defaultdict, deque

SSM_GET = "AmazonSSM.GetParameter"
SSM_MULTI = "AmazonSSM.GetParameters"
SM_GET = "secretsmanager.GetSecretValue"
ACCOUNT = "123456789012"
REGION = "us-east-1"

# 2022-11-16T08:22:40.362Z, the timestamp of the captures in http-api.md.
LAST_MODIFIED = "1.668586960362E9"

KINDS = (
    "ok", "delay", "500", "503", "throttling", "toomany", "429", "notfound",
    "accessdenied", "validation", "reset", "midbody", "hang",
    "drip", "early_hints", "big", "payload", "raw",
)
# The keyword parameters each hostile kind takes (and requires).
PARAMS = {
    "drip": ({"rate", "size"}, set()),
    "early_hints": ({"gap"}, set()),
    "big": ({"size", "framing"}, {"size"}),
    "payload": ({"body", "status"}, {"body"}),
    "raw": ({"data", "gap", "close"}, {"data"}),
}
FRAMINGS = ("length", "chunked", "close")
PIECE = 64 * 1024  # streamed bodies are written in pieces of this size
# Kinds a client with standard-mode retries must retry (and the rest it must not).
TRANSIENT = ("500", "503", "throttling", "toomany", "429", "reset", "midbody", "hang",
             "drip", "big")  # a drip ends in a timeout; "big" is over the 1 MiB cap
CLIENT_ERRORS = ("notfound", "accessdenied", "validation")


class Do:
    """One scripted behaviour: ``kind`` (see ``KINDS``) after ``delay_ms`` ms; the
    hostile kinds take keyword parameters (module docstring)."""

    __slots__ = ("kind", "delay_ms", "params")

    def __init__(self, kind="ok", delay_ms=0, **params):
        if kind not in KINDS:
            raise ValueError(f"unknown behaviour {kind!r}; one of {KINDS}")
        allowed, required = PARAMS.get(kind, (set(), set()))
        if set(params) - allowed or required - set(params):
            raise ValueError(f"{kind!r} takes {sorted(allowed) or 'no parameters'} "
                             f"(required: {sorted(required)}), got {sorted(params)}")
        if kind == "big" and params.get("framing", "length") not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}")
        self.kind = kind
        self.delay_ms = delay_ms
        self.params = params

    def __repr__(self):
        shown = "".join(f", {k}={v!r}" for k, v in self.params.items()
                        if not isinstance(v, bytes) or len(v) <= 40)
        return f"Do({self.kind!r}, delay_ms={self.delay_ms}{shown})"


def _as_do(item):
    if isinstance(item, Do):
        return item
    if isinstance(item, int):
        item = str(item)
    return Do(item)


class FakeAWS:
    """The fake endpoint; see the module docstring. Use as a context manager or ``close()``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._queue = deque()
        self._name_queues = defaultdict(deque)
        self._default = Do("ok")
        self._name_defaults = {}
        self._values = {}        # ssm name -> (value, type, version)
        self._secrets = {}       # secret id -> (string or None, binary or None, version id)
        self._counts = defaultdict(int)   # (target, name) -> n
        self._done = 0                    # calls whose answer has been written (or failed)
        self._done_cond = threading.Condition(self._lock)
        self.requests = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                try:
                    fake._handle(self)
                finally:
                    with fake._done_cond:
                        fake._done += 1
                        fake._done_cond.notify_all()

            def do_GET(self):
                self._send(404, {"__type": "UnknownOperationException"})

            def _send(self, status, payload, extra_headers=()):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                for name, value in extra_headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                # Status line, headers and body in one write: written apart, the body
                # waits ~40 ms for the delayed ACK of the headers (pitfalls.md).
                self._headers_buffer.append(b"\r\n" + body)
                self.flush_headers()

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            # socketserver's default backlog of 5 resets bursts of connections.
            request_queue_size = 256

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ scripting API

    def script(self, *behaviours, name=None):
        """Queue behaviours for the next calls (of ``name`` only, if given)."""
        items = [_as_do(b) for b in behaviours]
        with self._lock:
            (self._name_queues[name] if name is not None else self._queue).extend(items)

    def set_default(self, behaviour, name=None):
        """The behaviour once the queues are empty (for ``name`` only, if given)."""
        do = _as_do(behaviour)
        with self._lock:
            if name is None:
                self._default = do
            else:
                self._name_defaults[name] = do

    def clear_script(self):
        """Forget queued behaviours and per-name defaults; the default becomes ``ok``."""
        with self._lock:
            self._queue.clear()
            self._name_queues.clear()
            self._name_defaults.clear()
            self._default = Do("ok")

    def set_value(self, name, value, type_="String"):
        """Set the value of SSM parameter ``name`` (a change bumps its version)."""
        with self._lock:
            old = self._values.get(name)
            version = 1 if old is None else old[2] + (old[0] != value or old[1] != type_)
            self._values[name] = (value, type_, version)

    def set_secret(self, secret_id, string=None, binary=None):
        """Set secret ``secret_id`` to a SecretString or a SecretBinary (bytes)."""
        with self._lock:
            self._secrets[secret_id] = (string, binary, str(uuid.uuid4()))

    def calls(self, target=None, name=None):
        """How many calls reached the fake (optionally one X-Amz-Target / raw name)."""
        with self._lock:
            return sum(
                n for (t, nm), n in self._counts.items()
                if (target is None or t == target) and (name is None or nm == name)
            )

    def reset_counts(self):
        """Forget counted calls and recorded requests."""
        with self._lock:
            self._counts.clear()
            self.requests.clear()
            self._done = 0

    def wait_done(self, n, timeout=10.0):
        """Wait until ``n`` calls (since the last ``reset_counts``) have been answered
        in full or have failed; True if so within ``timeout`` s."""
        with self._done_cond:
            return self._done_cond.wait_for(lambda: self._done >= n, timeout)

    def ok_answer(self, name, target=SSM_GET):
        """The body (bytes) of the ``ok`` answer for ``name``, as a call would get it:
        for building ``raw`` answers that carry another name's value."""
        if target == SSM_GET:
            return self._ssm_ok(name, {"Name": name})
        return self._sm_ok(name)

    def requests_for(self, name):
        """The recorded requests (dicts) whose Name / SecretId is ``name``, in order."""
        with self._lock:
            return [r for r in self.requests if r["name"] == name]

    def close(self):
        """Stop serving; wakes hanging and delayed handlers. Idempotent."""
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

    # -------------------------------------------------------------- internals

    def _next(self, name):
        with self._lock:
            q = self._name_queues.get(name)
            if q:
                return q.popleft()
            if self._queue:
                return self._queue.popleft()
            return self._name_defaults.get(name, self._default)

    def _handle(self, h):
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        target = h.headers.get("X-Amz-Target")
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            h._send(400, {"__type": "SerializationException", "message": "bad JSON"})
            return
        names = body.get("Names") if target == SSM_MULTI and isinstance(body.get("Names"), list) else None
        name = names[0] if names else body.get("Name") if target == SSM_GET else body.get("SecretId")
        do = self._next(name)
        record = {"target": target, "name": name, "body": body,
                  "headers": list(h.headers.items()), "behaviour": do,
                  "sent": None, "complete": None, "client_port": h.client_address[1]}
        with self._lock:
            for counted in names or [name]:
                self._counts[(target, counted)] += 1
            self.requests.append(record)
        if do.delay_ms and self._stop.wait(do.delay_ms / 1000.0):
            return self._abort(h, reset=True)
        if target not in (SSM_GET, SM_GET) and not (names and do.kind in ("ok", "delay")):
            h._send(400, {"__type": "UnknownOperationException"})
            return
        kind = do.kind
        if names:
            h._send(200, {"InvalidParameters": [], "Parameters": [
                json.loads(self._ssm_ok(each, body))["Parameter"]
                for each in names]})
        elif kind in ("ok", "delay"):
            if not isinstance(name, str) or not name:
                h._send(400, {"__type": "ValidationException",
                              "message": "1 validation error detected"})
                return
            payload = self._ssm_ok(name, body) if target == SSM_GET else self._sm_ok(name)
            h._send(200, payload)
        elif kind in ("500", "503", "throttling", "toomany", "429", "notfound",
                      "accessdenied", "validation"):
            status, payload = self._error(kind, target, name)
            error_type = payload.get("__type") if isinstance(payload, dict) else None
            extra = [("x-amzn-ErrorType", error_type)] if error_type else []
            if kind == "429":
                # A throttle from something in front of AWS: plain JSON, no __type.
                h._send(429, b'{"message":"Too Many Requests"}')
            else:
                h._send(status, payload, extra)
        elif kind == "reset":
            self._abort(h, reset=True)
        elif kind == "midbody":
            full = self._ssm_ok(name, body) if target == SSM_GET else self._sm_ok(name)
            h.send_response(200)
            h.send_header("Content-Type", "application/x-amz-json-1.1")
            h.send_header("Content-Length", str(len(full) + 100))
            h.end_headers()
            h.wfile.write(full[: len(full) // 2])
            self._abort(h, reset=False)
        elif kind == "hang":
            self._stop.wait(120)
            self._abort(h, reset=True)
        elif kind in ("drip", "early_hints", "big", "payload", "raw"):
            if kind == "raw":
                data = do.params["data"]
                needs_ok = any(callable(p) for p in (data if isinstance(data, (list, tuple))
                                                     else [data]))
            elif kind == "payload":
                needs_ok = callable(do.params["body"])
            else:
                needs_ok = True
            ok = b""
            if needs_ok:
                if not isinstance(name, str) or not name:
                    h._send(400, {"__type": "ValidationException",
                                  "message": "1 validation error detected"})
                    return
                ok = self._ssm_ok(name, body) if target == SSM_GET else self._sm_ok(name)
            getattr(self, "_do_" + kind)(h, do.params, ok, record)

    # ------------------------------------------------------------ hostile kinds

    def _stream(self, h, record, pieces, total, chunked=False):
        """Write body pieces (``total`` bytes in all); record how much went out.
        Returns True if the whole body was written."""
        sent = 0
        try:
            for piece in pieces:
                if self._stop.is_set():
                    break
                if chunked:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    h.wfile.write(piece)
                sent += len(piece)
            if chunked and sent == total:
                h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        with self._lock:
            record["sent"], record["complete"] = sent, sent == total
        if sent != total:
            h.close_connection = True
        return sent == total

    @staticmethod
    def _padded(ok, size):
        """Pieces of ``ok`` followed by spaces, ``size`` bytes in all, PIECE at a time."""
        if size < len(ok):
            raise ValueError(f"size {size} is smaller than the answer ({len(ok)} bytes)")
        first = ok + b" " * max(0, min(PIECE, size) - len(ok))
        yield first
        left = size - len(first)
        blank = b" " * PIECE
        while left > 0:
            piece = blank if left >= PIECE else blank[:left]
            left -= len(piece)
            yield piece

    def _do_drip(self, h, params, ok, record):
        rate = params.get("rate", 10)
        size = params.get("size") or len(ok)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
                b"x-amzn-RequestId: %s\r\nContent-Length: %d\r\n\r\n"
                % (str(uuid.uuid4()).encode(), size))
        try:
            h.wfile.write(head)
        except OSError:
            h.close_connection = True
            return
        # A tenth of a second's worth of bytes ten times a second.
        step = max(1, rate // 10)
        interval = step / float(rate)

        def pieces():
            body_iter = self._padded(ok, size)
            pending = b""
            for chunk in body_iter:
                pending += chunk
                while len(pending) >= step:
                    yield pending[:step]
                    pending = pending[step:]
                    if self._stop.wait(interval):
                        return
            if pending:
                yield pending

        self._stream(h, record, pieces(), size)

    def _do_early_hints(self, h, params, ok, record):
        interim = (b"HTTP/1.1 103 Early Hints\r\n"
                   b"Link: </style.css>; rel=preload; as=style\r\n\r\n")
        gap = params.get("gap", 0.2)
        try:
            if gap:
                h.wfile.write(interim)
                if self._stop.wait(gap):
                    h.close_connection = True
                    return
                h.wfile.write(http_response(200, ok))
            else:
                h.wfile.write(interim + http_response(200, ok))
        except OSError:
            h.close_connection = True

    def _do_big(self, h, params, ok, record):
        size = params["size"]
        framing = params.get("framing", "length")
        lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/x-amz-json-1.1",
                 b"x-amzn-RequestId: " + str(uuid.uuid4()).encode()]
        if framing == "length":
            lines.append(b"Content-Length: %d" % size)
        elif framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        else:
            lines.append(b"Connection: close")
        try:
            h.wfile.write(b"\r\n".join(lines) + b"\r\n\r\n")
        except OSError:
            h.close_connection = True
            return
        self._stream(h, record, self._padded(ok, size), size, chunked=framing == "chunked")
        if framing == "close":
            h.close_connection = True

    def _do_payload(self, h, params, ok, record):
        body = params["body"]
        if callable(body):
            body = body(json.loads(ok))
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        h._send(params.get("status", 200), body)

    def _do_raw(self, h, params, ok, record):
        data = params["data"]
        pieces = data if isinstance(data, (list, tuple)) else [data]
        try:
            for i, piece in enumerate(pieces):
                if i and self._stop.wait(params.get("gap", 0.2)):
                    break
                h.wfile.write(piece(ok) if callable(piece) else piece)
        except OSError:
            h.close_connection = True
        if params.get("close"):
            h.close_connection = True

    @staticmethod
    def _abort(h, reset):
        """Close the connection now; with ``reset`` the peer gets a TCP RST."""
        h.close_connection = True
        sock = h.connection
        try:
            if reset:
                # SO_LINGER on with a zero timeout makes close() send RST, not FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # rfile holds a reference on the socket (makefile): close it first or
        # sock.close() would not close the descriptor.
        h.rfile.close()
        sock.close()

    def _ssm_ok(self, name, body):
        base, selector = name, None
        resource = name.split(":", 5)[5] if name.startswith("arn:") and name.count(":") >= 5 else name
        if ":" in resource:
            cut = name.rfind(":")
            base, selector = name[:cut], name[cut:]
        short = base.split(":parameter", 1)[1] if base.startswith("arn:") else base
        with self._lock:
            value, type_, version = self._values.get(
                short, (f"value-of-{short}", "String", 1)
            )
        if type_ == "SecureString" and not body.get("WithDecryption"):
            value = "AQICAHh" + base64.b64encode(value.encode()).decode()
        arn_path = short if short.startswith("/") else "/" + short
        param = {
            "ARN": f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{arn_path}",
            "DataType": "text",
            "LastModifiedDate": "__TS__",
            "Name": short,
            "Type": type_,
            "Value": value,
            "Version": version,
        }
        if selector is not None:
            param["Selector"] = selector
        return _with_timestamps({"Parameter": param})

    def _sm_ok(self, secret_id):
        with self._lock:
            string, binary, version_id = self._secrets.get(
                secret_id, (f"value-of-{secret_id}", None,
                            "b1c367b9-7f53-4a47-82c4-be51a054b953")
            )
        if secret_id.startswith("arn:") and ":secret:" in secret_id:
            short = secret_id.split(":secret:", 1)[1]
            if re.search(r"-[A-Za-z0-9]{6}$", short):
                # A full ARN: AWS answers with it, and the name without the suffix.
                arn, short = secret_id, short[:-7]
            else:
                arn = secret_id + "-AbCdEf"  # a partial ARN: AWS adds the suffix
        else:
            short = secret_id
            arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{short}-AbCdEf"
        out = {
            "ARN": arn,
            "CreatedDate": "__TS__",
            "Name": short,
            "VersionId": version_id,
            "VersionStages": ["AWSCURRENT"],
        }
        if binary is not None:
            out["SecretBinary"] = base64.b64encode(binary).decode()
        else:
            out["SecretString"] = string
        return _with_timestamps(out)

    @staticmethod
    def _error(kind, target, name):
        ssm = target == SSM_GET
        if kind == "500":
            return 500, {"__type": "InternalServerError" if ssm else "InternalServiceError",
                         "message": "An internal error occurred"}
        if kind == "503":
            return 503, {"__type": "ServiceUnavailable", "message": "Service unavailable"}
        if kind == "throttling":
            return 400, {"__type": "ThrottlingException", "message": "Rate exceeded"}
        if kind == "toomany":
            return 400, {"__type": "TooManyRequestsException", "message": "Too many requests"}
        if kind == "429":
            return 429, {}
        if kind == "notfound":
            if ssm:
                # SSM sends this one without any message.
                return 400, {"__type": "ParameterNotFound"}
            return 400, {"__type": "ResourceNotFoundException",
                         "Message": "Secrets Manager can't find the specified secret."}
        if kind == "accessdenied":
            return 400, {"__type": "AccessDeniedException",
                         "Message": f"User is not authorized to perform this operation "
                                    f"on resource {name}"}
        return 400, {"__type": "ValidationException",
                     "message": "1 validation error detected"}


def http_response(status, body, headers=(), reason=None):
    """The bytes of one HTTP/1.1 answer: status line, AWS's Content-Type, the given
    ``headers`` (pairs), Content-Length, body (bytes or a JSON-able object). For
    ``Do("raw", data=...)``: several answers in one write, an answer with a body
    its status must not have, and the like."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    reason = reason or http.server.BaseHTTPRequestHandler.responses.get(status, ("X",))[0]
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/x-amz-json-1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _with_timestamps(payload):
    """Serialise ``payload`` to bytes with "__TS__" replaced by an AWS-style epoch number."""
    text = json.dumps(payload)
    return text.replace('"__TS__"', LAST_MODIFIED).encode()


def main(argv):
    """``python fake_aws.py``: serve until stdin closes; prints the URL on stdout.

    Lets a load test run the fake in its own process, so that its work does not
    compete for the test process's GIL with the clients it measures.
    """
    import sys

    with FakeAWS() as fake:
        sys.stdout.write(fake.url + "\n")
        sys.stdout.flush()
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
