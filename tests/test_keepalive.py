"""Keep-alive connections as Lambda's frozen functions and real clients use them.

Between two invocations Lambda freezes every process of the environment, for seconds or
hours, and the monotonic clock runs on (docs/pitfalls.md, "Lambda's real life"): an idle
timer on a kept-alive connection expires during the freeze and fires at the thaw, at the
moment the function sends its next request, which then fails with a reset
(``http.client`` raises ``RemoteDisconnected``). So the extension (docs/http-api.md):

* never closes an idle keep-alive connection on a timer while fewer than
  ``PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS`` connections are open, and sends no
  ``Keep-Alive: timeout=`` header (no idle limit applies);
* when a new connection arrives and MAX_CLIENTS are open, closes the connection idle
  longest (between requests, no bytes pending) to admit it; when none is idle, the
  newcomer gets 429 ``TooManyConnections`` and is closed;
* still drops a request that has started arriving and does not complete within
  ``PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS`` of silence, or twice that while
  dripping;
* keeps the connection after a GET with ``Content-Length: 0`` (Java's
  ``java.net.http.HttpClient`` sends it on every GET, JDK-8283544), and after an
  HTTP/1.0 request with ``Connection: keep-alive``, which then gets
  ``Connection: keep-alive`` in the answer (ApacheBench ``-k`` waits for it, or for the
  close); closes after a GET with a body, and after a plain HTTP/1.0 request.

Requests are written on raw sockets so that what is sent and what comes back is exact.
The freeze itself, through the fake Lambda, is in test_real_life.py.
"""

import http.client
import json
import select
import socket
import time

import pytest

from conftest import TOKEN_HEADER, Headers, wait_for
from fake_aws import Do, FakeAWS

PARAM = "/keepalive/param"
VALUE = "kept-alive-value"
PATH = "/systemsmanager/parameters/get?name=%2Fkeepalive%2Fparam"
SLOW = "/keepalive/slow"
SLOW_PATH = "/systemsmanager/parameters/get?name=%2Fkeepalive%2Fslow"
READ_TIMEOUT = "PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS"
MAX_CLIENTS = "PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS"
# The smallest read timeout the extension accepts (docs/configuration.md): idling three
# times as long stays quick.
MIN_READ_TIMEOUT_S = 0.1


def request_bytes(path, token, version="HTTP/1.1", headers=(), body=b""):
    lines = [f"GET {path} {version}", "Host: localhost"]
    if token is not None:
        lines.append(f"{TOKEN_HEADER}: {token}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Raw:
    """One client connection on a raw socket, reading answers by Content-Length."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port = self.sock.getsockname()[1]
        self.timeout = timeout
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection (unparsed: {self.buffer!r})")
        self.buffer += chunk

    def response(self):
        """(status, Headers, body) of the next answer on this connection."""
        self.sock.settimeout(self.timeout)
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = Headers(tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:])
        length = int(headers.get("Content-Length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def exchange(self, data):
        self.send(data)
        return self.response()

    def closed_by_server(self, timeout):
        """True if the server closes (EOF or reset) within ``timeout`` s, False if the
        connection is still open then. Whatever arrived before the close is returned in
        ``self.buffer`` (a drop sends nothing)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except socket.timeout:
            return False
        except ConnectionError:
            return True

    def still_open_after(self, seconds):
        """Wait ``seconds`` watching the socket; True if nothing arrived and no close."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    def close(self):
        self.sock.close()


@pytest.fixture
def connections():
    """Factory ``connect(port) -> Raw``; every connection is closed at teardown."""
    made = []

    def connect(port):
        conn = Raw(port)
        made.append(conn)
        return conn

    yield connect
    for conn in made:
        conn.close()


@pytest.fixture
def served(moto, ssm, start_extension):
    """Factory: an extension with ``env`` against moto holding PARAM."""
    ssm.put_parameter(Name=PARAM, Value=VALUE, Type="String")

    def start(**env):
        return start_extension(moto, env=env)

    return start


def assert_value(status, headers, body):
    assert status == 200, body
    assert json.loads(body)["Parameter"]["Value"] == VALUE


def assert_kept(headers):
    """An answer that leaves the connection open, with no idle limit announced."""
    assert "close" not in headers.get("Connection", "").lower(), headers
    assert "Keep-Alive" not in headers, headers


# ------------------------------------------------------------- idle connections


@pytest.mark.parametrize("pieces", [1, 2], ids=["whole-request", "request-in-two-pieces"])
def test_idle_connection_outlives_three_read_timeouts(served, connections, pieces):
    """Idle 3x READ_TIMEOUT between requests, then used again: 200 on the same socket.

    Sent in two pieces 30 ms apart, the request after the idle spell is still served:
    its read deadline starts with its first byte, not when the wait for it began.
    """
    ext = served(**{READ_TIMEOUT: 100})
    conn = connections(ext.port)
    request = request_bytes(PATH, ext.token)
    status, headers, body = conn.exchange(request)
    assert_value(status, headers, body)
    assert_kept(headers)
    for spell in range(2):
        assert conn.still_open_after(3.5 * MIN_READ_TIMEOUT_S), (
            f"idle spell {spell}: the server closed an idle keep-alive connection "
            f"(unparsed {conn.buffer!r})\n{ext.stderr()}")
        if pieces == 1:
            conn.send(request)
        else:
            conn.send(request[:20])
            time.sleep(0.03)
            conn.send(request[20:])
        status, headers, body = conn.response()
        assert_value(status, headers, body)
        assert_kept(headers)
    assert conn.sock.getsockname()[1] == conn.local_port


def test_module_level_http_client_connection_survives_idle_spells(served):
    """What a function keeps at module level: an ``http.client.HTTPConnection``. After an
    idle spell of 3x READ_TIMEOUT the next request works on the same socket."""
    ext = served(**{READ_TIMEOUT: 100})
    conn = http.client.HTTPConnection("127.0.0.1", ext.port, timeout=5)
    try:
        assert ext.request_on(conn, "GET", PATH)[0] == 200
        sock = conn.sock
        port = sock.getsockname()[1]
        for _ in range(2):
            readable, _, _ = select.select([sock], [], [], 3.5 * MIN_READ_TIMEOUT_S)
            assert not readable, "the server closed the idle connection"
            status, headers, body = ext.request_on(conn, "GET", PATH)
            assert_value(status, headers, body)
            assert conn.sock is sock and sock.getsockname()[1] == port
    finally:
        conn.close()


def test_newcomer_evicts_the_connection_idle_longest(served, connections):
    """MAX_CLIENTS=2, both open and idle: a third connection is served, and the one idle
    longest (not the oldest) is closed to make room, with nothing sent to it."""
    ext = served(**{MAX_CLIENTS: 2})
    request = request_bytes(PATH, ext.token)
    a = connections(ext.port)
    assert_value(*a.exchange(request))
    b = connections(ext.port)
    assert_value(*b.exchange(request))

    # A and B open and idle, A idle longer: C is served and A is closed.
    c = connections(ext.port)
    status, headers, body = c.exchange(request)
    assert status == 200, f"the newcomer was refused: {status} {body!r}\n{ext.stderr()}"
    assert_kept(headers)
    assert a.closed_by_server(timeout=5.0), "the connection idle longest was not closed"
    assert a.buffer == b"", f"an evicted connection gets no answer, got {a.buffer!r}"
    assert_value(*b.exchange(request))  # B was kept

    # Now C is idle longer than B, although B is the older connection: D evicts C.
    d = connections(ext.port)
    assert_value(*d.exchange(request))
    assert c.closed_by_server(timeout=5.0), "the connection idle longest was not closed"
    assert c.buffer == b""
    assert_value(*b.exchange(request))
    assert_value(*d.exchange(request))


def test_newcomer_gets_429_when_every_connection_is_busy(start_extension, connections):
    """MAX_CLIENTS=2: one connection half way through sending a request, one waiting for
    a slow AWS answer. Neither is idle, so a newcomer gets 429 TooManyConnections and is
    closed; both busy connections then complete with 200."""
    with FakeAWS() as aws:
        aws.set_value(PARAM, VALUE)
        aws.set_value(SLOW, "slow-value")
        aws.set_default(Do("ok", delay_ms=1000), name=SLOW)
        ext = start_extension(aws.url, env={MAX_CLIENTS: 2, READ_TIMEOUT: 5000})
        request = request_bytes(PATH, ext.token)

        half = connections(ext.port)
        half.send(request[:30])  # started arriving: not idle
        waiting = connections(ext.port)
        waiting.send(request_bytes(SLOW_PATH, ext.token))

        def slow_call_started():
            if aws.calls(name=SLOW) == 1:
                return True
            if not waiting.still_open_after(0):
                status, _, body = waiting.response()
                pytest.fail(f"the 2nd of 2 allowed connections was answered {status} {body!r}: a connection "
                            "already closed by its client (the start-up /ping) still counted")
            return False

        wait_for(slow_call_started, message="the slow request to reach AWS")

        newcomer = connections(ext.port)
        status, headers, body = newcomer.exchange(request)
        assert status == 429, body
        assert json.loads(body)["__type"] == "TooManyConnections"
        assert headers["Connection"].lower() == "close"
        assert newcomer.closed_by_server(timeout=5.0)

        half.send(request[30:])
        assert_value(*half.response())
        status, _, body = waiting.response()
        assert status == 200, body
        assert json.loads(body)["Parameter"]["Value"] == "slow-value"


def test_connection_closed_by_its_client_does_not_count(served):
    """MAX_CLIENTS=2: a client reads its answer and closes, another client opens a
    connection and starts a request, a third connects at once. Only two connections are
    open, so the third is served, never refused with 429, however late the server notices
    the close: a connection with nothing but its end pending is not busy. Repeated, tight
    (no parsing between the steps), since the server may or may not have noticed yet."""
    ext = served(**{MAX_CLIENTS: 2})
    request = request_bytes(PATH, ext.token)
    refused = []
    for attempt in range(100):
        with socket.create_connection(("127.0.0.1", ext.port), timeout=5) as gone:
            gone.sendall(request)
            answer = gone.recv(65536)
            if not answer.startswith(b"HTTP/1.1 200 "):
                refused.append((attempt, "first connection", answer))
                continue
        busy = Raw(ext.port)
        newcomer = None
        try:
            busy.send(request[:10])  # before the newcomer connects: a request on its way
            newcomer = Raw(ext.port)
            status, _, body = newcomer.exchange(request)
            if status != 200:
                refused.append((attempt, status, body))
            busy.send(request[10:])
            assert_value(*busy.response())
        finally:
            busy.close()
            if newcomer is not None:
                newcomer.close()
    assert refused == [], f"{len(refused)} of 100 newcomers refused with one other connection open: {refused[:3]}"


# ------------------------------------------------------------- requests that stall


@pytest.mark.parametrize("sent", [b"G", b"GET /ping HTTP/1.1\r\nHost: localhost\r\n"],
                         ids=["first-byte", "headers-unfinished"])
def test_half_sent_request_is_dropped_at_the_read_timeout(served, connections, sent):
    """A request that started arriving and then went silent is dropped (closed, no
    answer) at READ_TIMEOUT; generous bound: 2 s for a 100 ms timeout."""
    ext = served(**{READ_TIMEOUT: 100})
    conn = connections(ext.port)
    conn.send(sent)
    assert conn.closed_by_server(timeout=2.0), "a silent half-sent request was kept past the read timeout"
    assert conn.buffer == b"", f"a dropped request gets no answer, got {conn.buffer!r}"


def test_half_sent_request_after_an_idle_spell_is_dropped(served, connections):
    """Idle between requests is unlimited, but a request started after the idle spell
    still has to arrive within the read timeout."""
    ext = served(**{READ_TIMEOUT: 100})
    conn = connections(ext.port)
    assert_value(*conn.exchange(request_bytes(PATH, ext.token)))
    assert conn.still_open_after(3.5 * MIN_READ_TIMEOUT_S)
    conn.send(b"GET /ping HTTP/1.1\r\n")
    assert conn.closed_by_server(timeout=2.0)
    assert conn.buffer == b""


def test_dripping_request_is_dropped_by_twice_the_read_timeout(served, connections):
    """One byte every 30 ms never leaves the socket silent for 100 ms; the request is
    dropped all the same, at 2x READ_TIMEOUT at the latest (bound here: 2 s)."""
    ext = served(**{READ_TIMEOUT: 100})
    conn = connections(ext.port)
    conn.send(b"GET /ping HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 2.0:
        try:
            conn.send(b"X")
        except OSError:
            closed = True
            break
        if conn.closed_by_server(timeout=0.03):
            closed = True
            break
    assert closed, "a dripping request was kept for 2 s with a 100 ms read timeout"
    assert conn.buffer == b""


# ------------------------------------------------------------- keep-alive with every client

# The headers Java 11-18's java.net.http.HttpClient sends on a plain-http GET by default
# (JDK-8283544: Content-Length: 0 on every GET; an h2c upgrade offer).
JAVA_HEADERS = (("Connection", "Upgrade, HTTP2-Settings"), ("Content-Length", "0"),
                ("HTTP2-Settings", "AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA"),
                ("Upgrade", "h2c"), ("User-Agent", "Java-http-client/17.0.2"))


@pytest.mark.parametrize("headers", [(("Content-Length", "0"),), JAVA_HEADERS],
                         ids=["content-length-0", "java-httpclient"])
def test_get_with_content_length_zero_keeps_the_connection(served, connections, headers):
    ext = served()
    conn = connections(ext.port)
    request = request_bytes(PATH, ext.token, headers=headers)
    for _ in range(3):
        status, answer_headers, body = conn.exchange(request)
        assert_value(status, answer_headers, body)
        assert_kept(answer_headers)
    assert not conn.closed_by_server(timeout=0.2)


@pytest.mark.parametrize("headers,body", [
    ((("Content-Length", "5"),), b"hello"),
    ((("Transfer-Encoding", "chunked"),), b"5\r\nhello\r\n0\r\n\r\n"),
], ids=["content-length-5", "chunked"])
def test_get_with_a_body_is_answered_then_closed(served, connections, headers, body):
    """The body is not read (a GET has no use for one): answered, then closed, so that
    the body is never taken for the next request."""
    ext = served()
    conn = connections(ext.port)
    status, answer_headers, answer = conn.exchange(request_bytes(PATH, ext.token, headers=headers, body=body))
    assert_value(status, answer_headers, answer)
    assert answer_headers["Connection"].lower() == "close"
    assert "Keep-Alive" not in answer_headers
    assert conn.closed_by_server(timeout=5.0)


def test_http10_keep_alive_gets_connection_keep_alive(served, connections):
    """ApacheBench -k's request: HTTP/1.0 with Connection: Keep-Alive. The answer says
    Connection: keep-alive (no Keep-Alive header) and the socket serves again."""
    ext = served()
    conn = connections(ext.port)
    request = request_bytes(PATH, ext.token, version="HTTP/1.0",
                            headers=(("Connection", "Keep-Alive"), ("User-Agent", "ApacheBench/2.3"),
                                     ("Accept", "*/*")))
    for _ in range(3):
        status, headers, body = conn.exchange(request)
        assert_value(status, headers, body)
        assert headers.get("Connection", "").lower() == "keep-alive", headers
        assert "Keep-Alive" not in headers, headers
    assert not conn.closed_by_server(timeout=0.2)


def test_http10_without_keep_alive_is_closed(served, connections):
    ext = served()
    conn = connections(ext.port)
    status, headers, body = conn.exchange(request_bytes(PATH, ext.token, version="HTTP/1.0"))
    assert_value(status, headers, body)
    assert headers["Connection"].lower() == "close"
    assert "Keep-Alive" not in headers
    assert conn.closed_by_server(timeout=5.0)


def test_many_idle_connections_below_the_limit_all_stay_open(served, connections):
    """Below MAX_CLIENTS nothing is evicted and nothing times out: eight connections idle
    3x READ_TIMEOUT, then each serves again."""
    ext = served(**{READ_TIMEOUT: 100, MAX_CLIENTS: 9})
    request = request_bytes(PATH, ext.token)
    conns = [connections(ext.port) for _ in range(8)]
    for conn in conns:
        assert_value(*conn.exchange(request))
    readable, _, _ = select.select([conn.sock for conn in conns], [], [], 3.5 * MIN_READ_TIMEOUT_S)
    assert readable == [], "the server closed idle connections below MAX_CLIENTS"
    for conn in conns:
        status, headers, body = conn.exchange(request)
        assert_value(status, headers, body)
        assert_kept(headers)
