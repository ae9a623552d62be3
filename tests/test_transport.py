"""The HTTP transport, in process: request heads, keep-alive decisions, answers,
admission, and an accept loop that survives a thread that cannot start.

read_request reads an HttpStream, which reads anything with recv: here bytes a peer sent
(then closed), counted as they are taken; connection_after and format_response are pure.
The Listener runs on 127.0.0.1 with a free port and a thread starter the test controls.
(tests/test_grammar.py holds the grammar's own cases, tests/test_fuzz.py its comparison
with h11.)
"""

import io
import json
import socket
import threading
import time

import pytest

import extension
from conftest import free_port, unit_service, wait_for


class Sent(io.BytesIO):
    """What a peer sent before it closed, read as a socket's recv reads it."""

    recv = io.BytesIO.read


def head(data):
    return extension.read_request(extension.HttpStream(Sent(data)))


def refused(data):
    with pytest.raises(extension.HttpProtocolError) as caught:
        head(data)
    return caught.value.status, caught.value.error_type


# ------------------------------------------------------------------ request heads


def test_a_plain_request_head():
    assert head(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Aws-Parameters-Secrets-Token:  t \r\n\r\n") == (
        "GET", "/ping", "HTTP/1.1", [("host", "x"), ("x-aws-parameters-secrets-token", "t")])


def test_repeated_headers_are_all_kept_in_order():
    _, _, _, headers = head(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\na: 2\r\n\r\n")
    assert headers == [("host", "x"), ("a", "1"), ("a", "2")]


def test_bare_line_feeds_and_one_leading_empty_line_are_accepted():
    assert head(b"\r\nGET / HTTP/1.0\nHost: x\n\n") == ("GET", "/", "HTTP/1.0", [("host", "x")])


@pytest.mark.parametrize("data", [b"", b"\r\n", b"GET / HTT", b"GET / HTTP/1.1\r\nHost: x\r\n"])
def test_end_of_stream_before_a_head_is_whole_is_a_connection_error(data):
    # Nobody to answer: the connection just ends (Listener._serve closes it).
    with pytest.raises(ConnectionError):
        head(data)


def test_headers_up_to_the_cap_are_read():
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    count = (extension.MAX_HEADER_BYTES - 2 - len(b"Host: x\r\n")) // len(line)
    _, _, _, headers = head(b"GET / HTTP/1.1\r\nHost: x\r\n" + line * count + b"\r\n")
    assert len(headers) == count + 1


def test_header_bytes_over_the_cap_are_431_and_the_rest_is_not_read():
    request_line = b"GET / HTTP/1.1\r\n"
    sent = Sent(request_line + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 100 + b"\r\n")
    with pytest.raises(extension.HttpProtocolError) as caught:
        extension.read_request(extension.HttpStream(sent))
    assert (caught.value.status, caught.value.error_type) == (431, "HeadersTooLarge")
    # Each read asks for no more than the line being read may hold: the request line's
    # (64 KiB from the start) or the header block's (32 KiB past the request line).
    assert sent.tell() == max(extension.MAX_START_LINE, len(request_line) + extension.MAX_HEADER_BYTES)


def test_one_huge_header_line_is_431():
    assert refused(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n") == (431, "HeadersTooLarge")


def test_more_than_100_header_lines_is_431():
    assert refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 100 + b"\r\n") == (431, "HeadersTooLarge")
    assert head(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 99 + b"\r\n") is not None


@pytest.mark.parametrize("line", [b"X-Forwarded-For : 1.2.3.4", b"Transfer-Encoding\t: chunked",
                                  b"No colon here", b"Bad(name): x", b": empty name", b"A: b\x00c", b"A: b\x7fc"])
def test_a_header_line_that_is_not_name_colon_value_is_400(line):
    assert refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n") == (400, "MalformedHeader")


def test_obsolete_line_folding_is_400():
    assert refused(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n  continued\r\n\r\n") == (400, "MalformedHeader")


@pytest.mark.parametrize("headers", [b"", b"Host: a\r\nHost: a\r\n"], ids=["none", "two"])
def test_an_http_1_1_request_without_exactly_one_host_is_400(headers):
    assert refused(b"GET / HTTP/1.1\r\n" + headers + b"\r\n") == (400, "BadRequest")


@pytest.mark.parametrize("headers", [b"Content-Length: -5", b"Content-Length: 5\r\nContent-Length: 6",
                                     b"Content-Length: 5, 5", b"Transfer-Encoding: gzip, chunked",
                                     b"Transfer-Encoding: chunked\r\nContent-Length: 5"])
def test_a_request_with_an_invalid_framing_is_400(headers):
    assert refused(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n") == (400, "BadRequest")


@pytest.mark.parametrize("line, expected", [
    (b"GET /", (400, "BadRequest")),                          # HTTP/0.9
    (b"GET / HTTP/1.1 extra", (400, "BadRequest")),
    (b"GET  / HTTP/1.1", (400, "BadRequest")),                # one space between the parts
    (b"GET /\tHTTP/1.1", (400, "BadRequest")),
    (b"GET /\xe9 HTTP/1.1", (400, "BadRequest")),             # the target is VCHAR only
    (b"GET /a\rb HTTP/1.1", (400, "BadRequest")),             # a bare CR
    (b"GET / HTTP/1.10", (400, "BadRequest")),
    (b"GET / HTTQ/1.1", (400, "BadRequest")),
    (b"G(T / HTTP/1.1", (400, "BadRequest")),
    (b"GET / HTTP/2.0", (505, "HTTPVersionNotSupported")),
    (b"PRI * HTTP/2.0", (505, "HTTPVersionNotSupported")),   # the HTTP/2 preface
    (b"GET / HTTP/0.9", (505, "HTTPVersionNotSupported")),
])
def test_request_lines_that_cannot_be_served(line, expected):
    assert refused(line + b"\r\n\r\n") == expected


def test_a_request_line_over_64_KiB_is_414():
    assert refused(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n") == (414, "RequestLineTooLong")


# ------------------------------------------------------------------ keep-alive


@pytest.mark.parametrize("method, version, headers, expected", [
    ("GET", "HTTP/1.1", [], (True, None)),
    ("GET", "HTTP/1.1", [("connection", "close")], (False, "close")),
    ("GET", "HTTP/1.1", [("connection", "Keep-Alive, Upgrade")], (True, None)),
    ("GET", "HTTP/1.0", [], (False, "close")),
    ("GET", "HTTP/1.0", [("connection", "keep-alive")], (True, "keep-alive")),
    # Java's HttpClient sends Content-Length: 0 on every GET: no body, so keep.
    ("GET", "HTTP/1.1", [("content-length", "0")], (True, None)),
    ("GET", "HTTP/1.1", [("content-length", "5")], (False, "close")),
    ("GET", "HTTP/1.1", [("content-length", "0"), ("content-length", "0")], (True, None)),
    ("GET", "HTTP/1.1", [("content-length", "00")], (True, None)),
    ("GET", "HTTP/1.1", [("transfer-encoding", "chunked")], (False, "close")),
    ("POST", "HTTP/1.1", [], (False, "close")),
])
def test_connection_after(method, version, headers, expected):
    assert extension.connection_after(method, version, headers) == expected


DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


def test_response_bytes(monkeypatch):
    monkeypatch.setattr(extension, "http_date", lambda: DATE)
    assert extension.format_response(200, (("X-A", "b"),), b"{}", "keep-alive") == (
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nX-A: b\r\nConnection: keep-alive\r\n\r\n{}")


def test_an_answer_to_head_has_no_body_and_no_content_length(monkeypatch):
    monkeypatch.setattr(extension, "http_date", lambda: DATE)
    assert extension.format_response(405, (("Allow", "GET"),), b'{"__type": "x"}', "close", head=True) == (
        b"HTTP/1.1 405 Method Not Allowed\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        b"Content-Type: application/json\r\nAllow: GET\r\nConnection: close\r\n\r\n")


def test_the_date_is_an_imf_fixdate_formatted_once_a_second(monkeypatch):
    now = [784111777.9]  # Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's own example
    made = []
    gmtime = time.gmtime
    monkeypatch.setattr(extension.time, "time", lambda: now[0])
    monkeypatch.setattr(extension.time, "gmtime", lambda seconds: made.append(seconds) or gmtime(seconds))
    assert extension.http_date() == DATE
    now[0] += 0.05
    assert extension.http_date() == DATE
    now[0] += 1
    assert extension.http_date() == "Sun, 06 Nov 1994 08:49:38 GMT"
    assert made == [784111777, 784111778]


@pytest.mark.parametrize("target, expected", [
    ("http://localhost:2773/secretsmanager/get?secretId=a", "/secretsmanager/get?secretId=a"),
    ("HTTPS://h/p", "/p"), ("http://h", "/"), ("http://h?x=1", "/?x=1"),
    ("/p?u=http://h/q", "/p?u=http://h/q"), ("ftp://h/p", "ftp://h/p"), ("*", "*"),
])
def test_an_absolute_form_target_is_its_path_and_query(target, expected):
    assert extension.origin_form(target) == expected


# ------------------------------------------------------------------ the listener


def make_service(**env):
    return unit_service(env)[0]


@pytest.fixture
def listening():
    """Start a Listener whose thread starter the test may make fail; stopped afterwards."""
    started = []

    def start(start_thread=None, **env):
        service = make_service(**env)
        sockets, problem = extension.bind_loopback(free_port())
        assert problem is None
        listener = extension.Listener(service, sockets, **({"start_thread": start_thread} if start_thread else {}))
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop(0.5)


def ping(port, host="127.0.0.1"):
    """The bytes answered to GET /ping; b"" when the server closed without answering (a
    close with the request unread is a reset, as TCP has it)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def test_a_thread_that_cannot_start_closes_that_connection_only(listening):
    failures = iter([RuntimeError("can't start new thread"), MemoryError()])

    def start_thread(function, args):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        threading.Thread(target=function, args=args, daemon=True).start()

    listener = listening(start_thread)
    port = listener.sockets[0].getsockname()[1]
    assert ping(port) == b""  # RuntimeError: closed, unanswered
    assert ping(port) == b""  # MemoryError: the same
    assert ping(port).startswith(b"HTTP/1.1 200 OK")
    if len(listener.sockets) == 2:
        assert ping(port, "::1").startswith(b"HTTP/1.1 200 OK")
    wait_for(lambda: not listener.clients._open, timeout=5, message="every place freed")  # none leaked
    warnings = [message for level, message in listener.service.log.lines if level == "warn"]
    assert warnings == ["closed a connection that could not be served (RuntimeError)",
                        "closed a connection that could not be served (MemoryError)"]


def test_accepted_connections_carry_ip_ttl_1(listening):
    seen = []

    def start_thread(function, args):
        sock = args[0].sock
        if sock.family == socket.AF_INET6:
            seen.append(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
        else:
            seen.append(sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL))
        threading.Thread(target=function, args=args, daemon=True).start()

    listener = listening(start_thread)
    port = listener.sockets[0].getsockname()[1]
    ping(port)
    if len(listener.sockets) == 2:
        ping(port, "::1")
    assert seen == [1] * len(listener.sockets)


def test_stop_returns_at_once_with_nothing_in_flight(listening):
    listener = listening()
    stopped = threading.Event()
    threading.Thread(target=lambda: (listener.stop(1.0), stopped.set()), daemon=True).start()
    assert stopped.wait(1.0)  # well under the old 200 ms poll plus the grace: no poll at all
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listener.sockets[0].getsockname()[1]), timeout=1)


def test_stop_waits_for_the_answer_of_a_request_begun(listening):
    # The stop used to count a request out before its answer was written: the process
    # could end between the two, and the caller's connection closed with no answer.
    listener = listening()
    computing, finish = threading.Event(), threading.Event()
    answer = listener.service.answer

    def slow_answer(*args):
        computing.set()
        finish.wait(5)
        return answer(*args)

    listener.service.answer = slow_answer
    with socket.create_connection(("127.0.0.1", listener.sockets[0].getsockname()[1]), timeout=5) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert computing.wait(5)
        stopped = threading.Event()
        threading.Thread(target=lambda: (listener.stop(5.0), stopped.set()), daemon=True).start()
        assert not stopped.wait(0.3)  # the answer is still being computed
        finish.set()
        assert stopped.wait(5)
        # By the time the stop returns the whole answer is out: no wait needed to read it.
        sock.setblocking(False)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    assert not [line for line in listener.service.log.lines if "still in flight" in line[1]]


def test_answer_never_raises_even_when_the_restore_check_does():
    service = make_service()

    def broken():
        raise MemoryError

    service.restores.check = broken
    status, _, body = service.answer("GET", "/ping", [("host", "x")])
    assert (status, json.loads(body)["__type"]) == (500, "InternalError")


def test_port_taken_on_ipv6_loopback_is_a_problem_and_nothing_stays_bound():
    try:
        blocker = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        blocker.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        blocker.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no ::1")
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        assert extension.bind_loopback(port) == (
            [], ("Extension.PortInUse", f"port {port} on ::1 is already in use"))
        # 127.0.0.1 was released again: the port can be had once ::1 is free.
        blocker.close()
        sockets, problem = extension.bind_loopback(port)
        assert problem is None and len(sockets) == 2
        for sock in sockets:
            sock.close()
    finally:
        blocker.close()


def test_port_taken_on_127_0_0_1_is_a_problem():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        assert extension.bind_loopback(port) == (
            [], ("Extension.PortInUse", f"port {port} on 127.0.0.1 is already in use"))


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9001", ("127.0.0.1", 9001)), ("localhost:80", ("localhost", 80)),
    ("[::1]:9001", ("::1", 9001)), ("sandbox.localdomain:1", ("sandbox.localdomain", 1)),
])
def test_runtime_api_addresses(value, expected):
    assert extension.runtime_api_address(value) == expected


@pytest.mark.parametrize("value", ["not a host:port", "127.0.0.1:", "127.0.0.1", " 127.0.0.1:9001", "127.0.0.1:0",
                                   "127.0.0.1:99999", "host:port", "my_host:9001", "[::1:9001", "h\u00e9:1"])
def test_malformed_runtime_api_addresses(value):
    with pytest.raises(ValueError, match=r"^AWS_LAMBDA_RUNTIME_API=.* is not host:port$"):
        extension.runtime_api_address(value)


def test_register_ends_by_its_deadline_however_lambda_drips():
    # One byte every 50 ms never leaves the socket silent for the 0.3 s timeout: only a
    # deadline on the whole exchange ends it.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        stop = threading.Event()

        def drip():
            connection, _ = server.accept()
            with connection:
                for byte in b"HTTP/1.1 200 OK\r\n" * 20:
                    if stop.wait(0.05):
                        return
                    connection.sendall(bytes([byte]))

        threading.Thread(target=drip, daemon=True).start()
        started = time.monotonic()
        try:
            with pytest.raises(socket.timeout):
                extension.register(f"127.0.0.1:{server.getsockname()[1]}", "name", timeout=0.3)
        finally:
            stop.set()
        assert time.monotonic() - started < 1.0
