"""Bad input and hostile callers.

Each case sends something malformed or hostile to a real extension subprocess over a
raw socket, checks that it gets the exact refusal, a 4xx with a JSON error type (a
request too large is answered too: what the server does not read it drains before it
closes), that nothing reached AWS, that it logged at most about one line (LOG_LEVEL=info), and then that the
SAME server still answers a well-formed request with 200. No input error may ever
produce a 500.

Facts used: SSM parameter names are 1-2048 characters (SSM API reference,
GetParameter ``Name``); README.md's error types (``MalformedQuery``,
``InvalidQueryValue``, ``RepeatedQueryKey``, ``ForwardedRequestRefused``,
``MissingToken`` 401, ``InvalidToken`` 403, ``MethodNotAllowed`` 405 + ``Allow: GET``,
``TooManyConnections`` 429) and its ``PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS``
/ ``PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS``. The HTTP/2 preface (``PRI * HTTP/2.0``)
is answered 505 ``HTTPVersionNotSupported``, the one refusal that is not a 4xx.
"""

import http.client
import json
import os
import socket
import time
import urllib.parse

import pytest

from conftest import TOKEN_HEADER, wait_for

GOOD_NAME = "/good/param"
GOOD_PATH = "/systemsmanager/parameters/get?name=" + urllib.parse.quote(GOOD_NAME, safe="")
SSM = "/systemsmanager/parameters/get"


class Served:
    """A started extension plus what each case needs around it."""

    def __init__(self, ext, fake):
        self.ext = ext
        self.fake = fake
        # Warm the cache: the follow-up "normal request" is then a hit, which does
        # not add AWS calls and (at INFO) should not add log lines.
        status, _, body = ext.get(GOOD_PATH)
        assert status == 200, body
        self.base_calls = fake.calls()
        before = self.log_count()
        assert ext.get(GOOD_PATH)[0] == 200
        settle()
        # Lines a normal request adds at INFO (expected 0, but not assumed).
        self.normal_lines = self.log_count() - before

    def log_count(self):
        return len([line for line in self.ext.logs().splitlines() if line.strip()])

    def new_aws_calls(self):
        return self.fake.calls() - self.base_calls

    def still_serves(self):
        status, _, body = self.ext.get(GOOD_PATH)
        assert status == 200, f"the server stopped serving after the case: {status} {body!r}"
        assert json.loads(body)["Parameter"]["Value"] == "value-of-" + GOOD_NAME
        assert self.ext.alive()


def settle():
    # Lets a handler thread that already answered finish writing its log line. Short
    # on purpose; the log bound below is generous by one line anyway.
    time.sleep(0.15)


@pytest.fixture
def served_with(fake, start_extension):
    """Factory: a fresh extension with extra ``env`` (for cases that need a setting)."""

    def start(env=None):
        env = dict(env or {})
        env.setdefault("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "info")
        return Served(start_extension(fake.url, env=env), fake)

    return start


@pytest.fixture(scope="module")
def shared_served(fake_module, start_extension_module):
    """One extension (LOG_LEVEL=info) that takes every case needing no special setting,
    one after the other: stopping an extension costs ~0.5 s, and a server that has
    survived all the earlier cases is an even better check."""
    ext = start_extension_module(fake_module.url,
                                 env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
    yield Served(ext, fake_module)
    ext.stop()  # before the fake closes


@pytest.fixture
def served(shared_served):
    """The shared extension, checked to be alive and with AWS calls counted from now."""
    assert shared_served.ext.alive(), "an earlier case killed the shared extension"
    shared_served.base_calls = shared_served.fake.calls()
    return lambda: shared_served


def raw(port, data, timeout=5.0):
    """Send raw bytes on a new connection; read one HTTP response.

    Returns ``(status, headers dict lower-cased, body bytes)``, or ``None`` when the
    server closed or reset the connection without a parsable response. Fails the
    test if the server neither answers nor closes within ``timeout``.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may refuse the rest of an oversized request and close
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
            body = resp.read()
        except socket.timeout:
            pytest.fail(f"no answer and no close within {timeout} s")
        except (http.client.RemoteDisconnected, ConnectionError,
                http.client.IncompleteRead):
            return None
        except http.client.BadStatusLine as exc:
            pytest.fail(f"the answer is not an HTTP/1.x status line: {exc!r}")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        sock.close()


def request_bytes(target, token=None, extra=(), method="GET", version="HTTP/1.1"):
    lines = [f"{method} {target} {version}", "Host: localhost"]
    if token is not None:
        lines.append(f"{TOKEN_HEADER}: {token}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_type(body):
    try:
        return json.loads(body).get("__type")
    except ValueError:
        pytest.fail(f"error body is not JSON: {body[:300]!r}")


def check_case(s, action):
    """Run ``action``; then the common checks of every case."""
    before = s.log_count()
    action()
    s.still_serves()
    settle()
    new_lines = s.log_count() - before - s.normal_lines
    assert new_lines <= 1, (
        f"{new_lines} log lines for one bad request:\n"
        + "\n".join(s.ext.logs().splitlines()[before:])
    )


def expect_4xx(resp, status, etype):
    """``resp`` is the refusal ``status`` (a 4xx) with the JSON error type ``etype``."""
    assert 400 <= status < 500, status
    assert resp is not None, "the connection was closed without an answer"
    got, _, body = resp
    assert got == status, (got, body[:300])
    assert error_type(body) == etype, body[:300]


# --------------------------------------------------------------- query problems

QUERY_CASES = [
    ("pct-zz", SSM + "?name=%zz", 400, "MalformedQuery"),
    ("pct-truncated-utf8", SSM + "?name=%E2%82", 400, "MalformedQuery"),
    ("pct-lone-percent", SSM + "?name=abc%", 400, "MalformedQuery"),
    ("non-utf8", SSM + "?name=%ff", 400, "MalformedQuery"),
    ("overlong-utf8", SSM + "?name=%C0%AF", 400, "MalformedQuery"),
    ("nul", SSM + "?name=a%00b", 400, "MalformedQuery"),
    ("secret-pct-zz", "/secretsmanager/get?secretId=%zz", 400, "MalformedQuery"),
    ("secret-nul", "/secretsmanager/get?secretId=x%00", 400, "MalformedQuery"),
    ("empty-name", SSM + "?name=", 400, "InvalidQueryValue"),
    ("empty-secret-id", "/secretsmanager/get?secretId=", 400, "InvalidQueryValue"),
    ("name-2049", SSM + "?name=" + "a" * 2049, 400, "InvalidQueryValue"),
    ("repeated-name", SSM + "?name=a&name=b", 400, "RepeatedQueryKey"),
    ("repeated-same-name", SSM + "?name=a&name=a", 400, "RepeatedQueryKey"),
    ("repeated-decryption", SSM + "?name=a&withDecryption=true&withDecryption=false",
     400, "RepeatedQueryKey"),
    ("repeated-secret-id", "/secretsmanager/get?secretId=a&secretId=b", 400,
     "RepeatedQueryKey"),
]


@pytest.mark.parametrize("target, status, etype", [c[1:] for c in QUERY_CASES],
                         ids=[c[0] for c in QUERY_CASES])
def test_bad_query_is_a_clear_400(served, target, status, etype):
    s = served()

    def action():
        resp = raw(s.ext.port, request_bytes(target, token=s.ext.token))
        expect_4xx(resp, status, etype)
        assert s.new_aws_calls() == 0, "a bad request reached AWS"

    check_case(s, action)


def test_raw_non_utf8_bytes_in_request_line(served):
    s = served()

    def action():
        data = (b"GET " + SSM.encode() + b"?name=\xff\xfe HTTP/1.1\r\nHost: x\r\n"
                + f"{TOKEN_HEADER}: {s.ext.token}\r\n\r\n".encode())
        # A target is visible ASCII only (RFC 9112 section 3.2): refused before the query.
        expect_4xx(raw(s.ext.port, data), 400, "BadRequest")
        assert s.new_aws_calls() == 0

    check_case(s, action)


def test_name_of_2048_characters_is_forwarded(served):
    # The boundary: 2048 is a valid SSM name length and must reach AWS untouched.
    s = served()
    name = "/" + "n" * 2047
    status, _, body = s.ext.get(SSM + "?name=" + urllib.parse.quote(name, safe=""))
    assert status == 200, body[:300]
    assert json.loads(body)["Parameter"]["Name"] == name
    assert s.fake.calls(name=name) == 1
    s.still_serves()


# --------------------------------------------------------------- framing problems


def test_very_long_request_line(served):
    s = served()

    def action():
        target = SSM + "?name=" + "a" * (70 * 1024)
        resp = raw(s.ext.port, request_bytes(target, token=s.ext.token))
        # The server reads 64 KiB of the line at most and answers; what is left (a few KiB)
        # it drains before it closes, so the answer is never lost to a reset.
        expect_4xx(resp, 414, "RequestLineTooLong")
        assert resp[1]["connection"] == "close"
        assert s.new_aws_calls() == 0

    check_case(s, action)


def test_very_long_header(served):
    s = served()

    def action():
        data = request_bytes(GOOD_PATH, token=s.ext.token, extra=["X-Junk: " + "j" * 70 * 1024])
        # Answered, then drained and closed, as for the long request line.
        resp = raw(s.ext.port, data)
        expect_4xx(resp, 431, "HeadersTooLarge")
        assert resp[1]["connection"] == "close"

    check_case(s, action)


def test_too_many_headers(served):
    s = served()

    def action():
        extra = [f"X-H{i}: v" for i in range(150)]
        # More than 100 header lines are refused.
        expect_4xx(raw(s.ext.port, request_bytes(GOOD_PATH, token=s.ext.token, extra=extra)),
                   431, "HeadersTooLarge")

    check_case(s, action)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_non_get_methods_are_405(served, method):
    s = served()

    def action():
        data = request_bytes(GOOD_PATH, token=s.ext.token, method=method,
                             extra=["Content-Length: 2"]) + b"{}"
        resp = raw(s.ext.port, data)
        expect_4xx(resp, 405, "MethodNotAllowed")
        assert "GET" in resp[1].get("allow", ""), resp[1]
        assert s.new_aws_calls() == 0

    check_case(s, action)


def test_unknown_method_is_refused_without_500(served):
    s = served()

    def action():
        resp = raw(s.ext.port, request_bytes(GOOD_PATH, token=s.ext.token, method="FROB"))
        # Any method but GET is 405 with Allow: GET (README.md), a method http.server has
        # never heard of as well (not its default 501).
        expect_4xx(resp, 405, "MethodNotAllowed")
        assert resp[1].get("allow") == "GET", resp[1]

    check_case(s, action)


def test_http_0_9_request(served):
    s = served()

    def action():
        # No headers, so no token: it can only be refused, at once and with a status
        # line (a bare HTTP/0.9 body is not an answer a client can read).
        resp = raw(s.ext.port, b"GET /\r\n")
        expect_4xx(resp, 400, "BadRequest")

    check_case(s, action)


# kind: (bytes sent, status, __type of the answer). Each is a few hundred bytes at
# most, read whole by the server, so the answer is not lost to a reset.
GARBAGE = {
    "binary": (bytes(range(256)) + b"\r\n\r\n", 400, "BadRequest"),
    "tls-client-hello": (bytes.fromhex("160301020001000100fc0303") + os.urandom(64)
                         + b"\r\n\r\n", 400, "BadRequest"),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTPVersionNotSupported"),
    "only-crlf": (b"\r\n" * 20, 400, "BadRequest"),
    "bad-version": (b"GET / HTTP/x.y\r\n\r\n", 400, "BadRequest"),
    # An invalid framing is refused before anything else, the token too (RFC 9112 section 6.3).
    "bad-content-length": (b"GET " + GOOD_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: -5\r\n\r\n", 400, "BadRequest"),
    "content-length-and-chunked": (b"GET " + GOOD_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                                   400, "BadRequest"),
    "no-host": (b"GET /ping HTTP/1.1\r\n\r\n", 400, "BadRequest"),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_bytes(served, kind):
    s = served()
    data, status, etype = GARBAGE[kind]

    def action():
        resp = raw(s.ext.port, data)
        assert resp is not None, "the connection was closed without an answer"
        got, _, body = resp
        assert (got, error_type(body)) == (status, etype), body[:300]
        assert s.new_aws_calls() == 0

    check_case(s, action)


def test_request_cut_off_half_way(served):
    s = served()

    def action():
        sock = socket.create_connection(("127.0.0.1", s.ext.port), timeout=5)
        sock.sendall(f"GET {GOOD_PATH} HTTP/1.1\r\nHost: x\r\n{TOKEN_HEADER}: ".encode())
        sock.close()
        # Another request half-sent then half-closed (FIN), waiting for the answer.
        sock = socket.create_connection(("127.0.0.1", s.ext.port), timeout=5)
        sock.sendall(f"GET {GOOD_PATH} HTTP/1.1\r\nHost: x\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        try:
            data = sock.recv(65536)
        except ConnectionError:
            data = b""
        finally:
            sock.close()
        # The client ended its side mid-head: nothing to answer, the server just closes.
        assert data == b"", data[:200]

    check_case(s, action)


# ------------------------------------------------------------------- slowloris


def _closed_by_server(sock, timeout):
    """True once the server closed ``sock`` (EOF or reset), within ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            # Bytes before the close (a 408 answer, say) are fine: read on until EOF.
    except socket.timeout:
        return False
    except ConnectionError:
        return True


def test_half_sent_requests_are_closed_after_the_read_timeout(served_with):
    # MAX_CLIENTS=3: two half-sent requests must not starve the others, and once the
    # server dropped them their slots are free again. (A connection that has sent
    # nothing is idle, not half-sent: it is kept, see test_connection_bound.)
    s = served_with({"PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS": 500,
                "PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 3})
    sent = f"GET {GOOD_PATH} HTTP/1.1\r\nHost: x\r\n".encode()

    def action():
        idle = [socket.create_connection(("127.0.0.1", s.ext.port), timeout=5)
                for _ in range(2)]
        try:
            for sock in idle:
                sock.sendall(sent)
            # Meanwhile the server answers others.
            assert s.ext.get(GOOD_PATH)[0] == 200
            started = time.monotonic()
            for sock in idle:
                assert _closed_by_server(sock, timeout=5.0), \
                    "a half-sent request was kept open long past the 500 ms read timeout"
            assert time.monotonic() - started < 6.0
        finally:
            for sock in idle:
                sock.close()
        # The slots were released: three connections at once are served again.
        conns = [s.ext.connection(timeout=5) for _ in range(3)]
        try:
            for conn in conns:
                assert s.ext.request_on(conn, "GET", GOOD_PATH)[0] == 200
        finally:
            for conn in conns:
                conn.close()

    check_case(s, action)


def test_slow_drip_request_is_closed_at_the_read_timeout(served_with):
    # Classic slowloris: one header byte every 100 ms never leaves the socket silent for
    # 500 ms, so only a deadline on the whole request (not a per-read timeout) ends it.
    s = served_with({"PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS": 500})

    def action():
        sock = socket.create_connection(("127.0.0.1", s.ext.port), timeout=5)
        started = time.monotonic()
        closed = False
        try:
            sock.sendall(f"GET {GOOD_PATH} HTTP/1.1\r\n".encode())
            while time.monotonic() - started < 5.0:
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed = True
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(65536) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
                except ConnectionError:
                    closed = True
                    break
        finally:
            sock.close()
        assert closed, "a request dripping one byte per 100 ms held its connection for 5 s"
        assert time.monotonic() - started < 3.0

    check_case(s, action)


# ------------------------------------------------------------- refused callers


def test_x_forwarded_for_is_refused(served):
    s = served()

    def action():
        data = request_bytes(GOOD_PATH, token=s.ext.token, extra=["X-Forwarded-For: 10.0.0.1"])
        expect_4xx(raw(s.ext.port, data), 400, "ForwardedRequestRefused")
        # Even an empty X-Forwarded-For is a sign of a proxy.
        data = request_bytes(GOOD_PATH, token=s.ext.token, extra=["X-Forwarded-For: "])
        expect_4xx(raw(s.ext.port, data), 400, "ForwardedRequestRefused")

    check_case(s, action)


def _bad_tokens(token):
    last = token[-1]
    flipped = token[:-1] + ("A" if last != "A" else "B")
    return {
        "last-byte": flipped,
        "shorter": token[:-1],
        "longer": token + "x",
        "prefix-only": token[:4],
        "non-ascii": token[:-1] + "\u00e9",
    }


@pytest.mark.parametrize("case", ["last-byte", "shorter", "longer", "prefix-only", "non-ascii"])
def test_wrong_token_is_403(served, case):
    s = served()

    def action():
        bad = _bad_tokens(s.ext.token)[case]
        resp = raw(s.ext.port, request_bytes(GOOD_PATH, token=bad))
        expect_4xx(resp, 403, "InvalidToken")
        body = resp[2].decode("utf-8", "replace")
        assert s.ext.token not in body and bad not in body, "the error echoes a token"
        assert s.new_aws_calls() == 0

    check_case(s, action)


def test_missing_token_is_401(served):
    s = served()

    def action():
        expect_4xx(raw(s.ext.port, request_bytes(GOOD_PATH)), 401, "MissingToken")
        # The token is checked before the query: a bad query without a token is 401.
        expect_4xx(raw(s.ext.port, request_bytes(SSM + "?name=%zz")), 401, "MissingToken")
        assert s.new_aws_calls() == 0

    check_case(s, action)


# ------------------------------------------------------------- connection bound


@pytest.mark.parametrize("idle_kind", ["connected", "keep-alive"])
def test_connection_bound(served_with, idle_kind):
    # At MAX_CLIENTS the connection idle longest makes room for a newcomer: idle
    # connections are never closed on a timer (a Lambda freeze would fire it under the
    # caller's next request), only when their place is needed.
    s = served_with({"PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 4})

    def action():
        idle = []
        try:
            for _ in range(4):
                if idle_kind == "keep-alive":
                    conn = s.ext.connection(timeout=5)
                    assert s.ext.request_on(conn, "GET", GOOD_PATH)[0] == 200
                    idle.append(conn.sock)
                else:
                    idle.append(socket.create_connection(("127.0.0.1", s.ext.port), timeout=5))
                time.sleep(0.05)  # distinct idle-since times, oldest first
            # The fifth is served, and the oldest idle connection was closed for it.
            resp = raw(s.ext.port, request_bytes(GOOD_PATH, token=s.ext.token))
            assert resp[0] == 200, resp
            assert _closed_by_server(idle[0], timeout=5.0)
            for sock in idle[1:]:
                sock.settimeout(0.2)
                with pytest.raises(socket.timeout):
                    sock.recv(1)  # still open: nothing to read, no EOF
        finally:
            for c in idle:
                c.close()
        wait_for(lambda: s.ext.get(GOOD_PATH)[0] == 200, timeout=5,
                 message="the server to serve again after the idle connections closed")

    check_case(s, action)
