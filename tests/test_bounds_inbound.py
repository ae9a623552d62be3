"""Bounds and hygiene on the request side (docs/pitfalls.md, "What a hostile or broken
peer does").

Black-box: each test talks to the real extension subprocess over raw sockets (the
extension's AWS is ``fake_aws.FakeAWS``). What is pinned (docs/http-api.md, "Errors"
and "Where it listens"; docs/configuration.md, "AWS conventions" and "Refusing to
start"):

* Header caps: the request header block (every header line after the request line,
  CRLFs included) is capped at 32 KiB (32768 bytes) and at 100 header lines. Over
  either: 431, ``__type`` ``HeadersTooLarge``, ``Connection: close``, connection
  closed; checked while the headers arrive (the answer comes before the header block
  ends) and before the token check (no token needed to get 431). ``/ping`` with 31 KiB
  of headers is still 200; after a 6.4 MB header flood the server still answers
  ``/ping``. docs/pitfalls.md: ``http.server`` alone reads 100 headers of 64 KiB each
  (6.4 MB) before any handler code runs.
* Header hygiene: a repeated ``X-Aws-Parameters-Secrets-Token`` is 400
  ``RepeatedHeader`` whatever the order of right and wrong; white space between a
  header name and its colon, and a line starting with a space or a tab (obs-fold), are
  400 ``MalformedHeader`` and the connection closes; ``Forwarded: for=...`` is 400
  ``ForwardedRequestRefused`` like ``X-Forwarded-For``.
* What logs and errors echo: a path holding a control character is refused (400
  ``BadRequest``) and never logged; control characters of a logged query key are
  escaped (``\\x1b``, never the raw byte); an unknown query key is echoed cut to 16
  characters, the cut marked ``…`` (U+2026): ``unknown query key 'abcdefghijklmnop…'``;
  a key that contains the request token, or whose first 16 characters appear in it, is
  refused as a value holding it is (400 ``TokenInQuery``) and never echoed nor logged.
* ``::1`` port taken: when ``::1`` is available but another process holds its port, the
  extension exits at start (code 2 outside Lambda) with "port N on ::1 is already in
  use".
* Relative URI: ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` not starting with ``/``
  (``@127.0.0.1:PORT/x`` would make the link-local URL point at 127.0.0.1): start-up is
  refused (exit 2, the message names the variable) and nothing connects to PORT.
* Endpoint URL with a password: a bad ``AWS_ENDPOINT_URL`` with credentials in it fails
  start-up with a message that shows neither the password nor ``user:``. (The IP TTL 1
  of accepted sockets cannot be seen from the client side: tests/test_transport.py
  checks it.)

Error bodies are always JSON ``{"__type": ..., "message": ...}`` (docs/http-api.md).
"""

import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

import conftest
from conftest import TOKEN_HEADER, wait_for
from fake_aws import FakeAWS

NAME = "/bounds/in"
GOOD = "/systemsmanager/parameters/get?name=" + urllib.parse.quote(NAME, safe="")
HEADER_CAP = 32 * 1024
MAX_HEADER_LINES = 100


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fake():
    with FakeAWS() as f:
        yield f


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fake):
    """One extension for every case that needs no special setting (LOG_LEVEL=debug:
    the cases on what logs and errors echo check what even the most verbose log holds)."""
    launcher = conftest.ExtensionLauncher(tmp_path_factory)
    ext = launcher(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
                                  "PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 256})
    yield ext
    launcher.stop_all()


@pytest.fixture
def ext(shared):
    assert shared.alive(), "an earlier case killed the shared extension"
    yield shared
    # Every case leaves a server that still answers a well-formed request.
    status, _, body = shared.get(GOOD)
    assert status == 200, f"the server stopped serving after the case: {status} {body[:300]!r}"
    assert json.loads(body)["Parameter"]["Value"] == "value-of-" + NAME


# ------------------------------------------------------------------ raw HTTP


class Answer:
    """One HTTP answer read off a raw socket, and what the server did afterwards."""

    def __init__(self, status, headers, body, closed):
        self.status = status
        self.headers = headers      # lower-cased names
        self.body = body
        self.closed = closed        # the server closed the connection after answering

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"error body is not JSON (status {self.status}): {self.body[:300]!r}")

    def error_type(self):
        parsed = self.json()
        assert set(parsed) == {"__type", "message"}, parsed
        assert isinstance(parsed["message"], str), parsed
        return parsed["__type"]

    def __repr__(self):
        return f"Answer({self.status}, {self.headers}, {self.body[:200]!r}, closed={self.closed})"


def _parse(data):
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, f"not an HTTP/1.x status line: {lines[0]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return int(match.group(1)), headers, rest[:length]


def read_answer(sock, timeout=5.0, close_wait=2.0):
    """Read one answer on ``sock``, then whether the server closes within ``close_wait`` s.

    An answer followed by a reset counts as answered and closed: a server that closes
    with unread request bytes makes the kernel send RST, which is still a close.
    Fails the test when no complete answer comes within ``timeout`` s.
    """
    sock.settimeout(timeout)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    parsed = None
    while parsed is None:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            pytest.fail(f"no complete answer within {timeout} s; got {data[:300]!r}")
        except ConnectionError:
            chunk = b""
        if not chunk:
            closed = True
            parsed = _parse(data)
            if parsed is None:
                pytest.fail(f"the connection closed without a complete answer: {data[:300]!r}")
            break
        data += chunk
        parsed = _parse(data)
    if not closed:
        sock.settimeout(close_wait)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                pytest.fail(f"bytes after the answer: {chunk[:200]!r}")
        except socket.timeout:
            closed = False
        except ConnectionError:
            closed = True
    return Answer(*parsed, closed=closed)


def exchange(port, data, timeout=5.0, close_wait=2.0):
    """Send ``data`` on a new connection (the server may stop reading part-way) and
    read the answer (see ``read_answer``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server refused the rest and closed: its answer may still be there
        return read_answer(sock, timeout, close_wait)
    finally:
        sock.close()


def request(target, headers=(), token=None, method="GET"):
    """Request bytes: request line, Host, the token header if given, ``headers`` (raw
    lines), blank line."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if token is not None:
        lines.append(f"{TOKEN_HEADER}: {token}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def filler(total, first=0, line_size=1024):
    """Header lines of ``line_size`` bytes each (CRLF included) adding up to ``total``
    bytes; the last one shorter if needed. Names X-Fill-<n>."""
    lines = []
    n = first
    left = total
    while left > 0:
        size = min(line_size, left)
        name = f"X-Fill-{n}: "
        assert size >= len(name) + 3, "filler line too short"
        lines.append(name + "f" * (size - len(name) - 2))
        left -= size
        n += 1
    return lines


def block_size(lines):
    return sum(len(line) + 2 for line in lines)


def vm_hwm_kib(pid):
    """Peak resident set size (VmHWM) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def assert_431(answer):
    assert answer.status == 431, answer
    assert answer.error_type() == "HeadersTooLarge", answer
    assert answer.headers.get("connection", "").lower() == "close", answer
    assert answer.closed, "the connection stayed open after 431"


# ------------------------------------------------------- header caps


def test_31_kib_of_headers_is_served(ext):
    # Host (17 bytes) + 31 KiB of filler: well under the 32 KiB cap.
    lines = filler(31 * 1024)
    answer = exchange(ext.port, request("/ping", lines), close_wait=0.2)
    assert answer.status == 200, answer
    assert answer.json() == {"status": "ok"}
    # The same on an authenticated route: the token header counts too, still under.
    answer = exchange(ext.port, request(GOOD, lines, token=ext.token), close_wait=0.2)
    assert answer.status == 200, answer
    assert answer.json()["Parameter"]["Value"] == "value-of-" + NAME


@pytest.mark.parametrize("total", [HEADER_CAP + 1024, 40 * 1024], ids=["33KiB", "40KiB"])
def test_header_block_over_32_kib_is_431_without_token(ext, total):
    # No token on a route that needs one: the cap is checked before the token (a 401
    # here would mean the whole block was read and parsed first). Lines of 1 KiB each,
    # 33 or 40 of them: far under the line-count cap.
    lines = filler(total - len("Host: localhost\r\n"))
    assert block_size(["Host: localhost"] + lines) == total
    assert_431(exchange(ext.port, request(GOOD, lines)))


def test_101_header_lines_is_431(ext):
    # 101 short lines (Host + 100): about 1.5 KiB, far under the byte cap.
    lines = [f"X-L{i}: v" for i in range(MAX_HEADER_LINES)]
    assert_431(exchange(ext.port, request(GOOD, lines)))


def test_100_header_lines_is_served(ext):
    # Host + token + 98: exactly 100 header lines.
    lines = [f"X-L{i}: v" for i in range(MAX_HEADER_LINES - 2)]
    answer = exchange(ext.port, request(GOOD, lines, token=ext.token), close_wait=0.2)
    assert answer.status == 200, answer


def test_cap_is_checked_while_the_headers_arrive(ext):
    # 40 KiB of header lines and no blank line: the header block never ends. The
    # answer must come anyway, long before the read timeout (10 s by default): the
    # extension stopped reading at the cap rather than waiting for the end.
    sock = socket.create_connection(("127.0.0.1", ext.port), timeout=5)
    try:
        head = "\r\n".join([f"GET {GOOD} HTTP/1.1", "Host: localhost"] + filler(40 * 1024))
        sock.sendall((head + "\r\n").encode("latin-1"))
        started = time.monotonic()
        answer = read_answer(sock, timeout=3.0)
        assert time.monotonic() - started < 3.0
    finally:
        sock.close()
    assert_431(answer)


def _flood(port, payload):
    """Send one flood request; return the answer or None (reset before it could be read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(payload)
        except OSError:
            pass
        try:
            return read_answer(sock, timeout=10, close_wait=2)
        except pytest.fail.Exception:
            return None
    finally:
        sock.close()


FLOOD_LINE = "X-Flood-{}: " + "a" * (64 * 1024 - 20)


def flood_request():
    # 100 header lines of 64 KiB each: 6.4 MB, what http.server alone would hold.
    return request("/ping", [FLOOD_LINE.format(i) for i in range(100)])


def test_header_flood_then_ping(ext):
    answer = _flood(ext.port, flood_request())
    # The server closes with most of the flood unread, so the kernel may reset the
    # connection before the answer is read; an answer that did arrive is the 431.
    if answer is not None:
        assert_431(answer)
    status, _, body = ext.get("/ping", token=None)
    assert status == 200, body
    assert ext.alive()


def test_concurrent_header_floods_do_not_grow_memory(fake, start_extension):
    # 16 floods of 6.4 MB at once. Held whole they would cost at least 100 MB of peak
    # memory; capped at 32 KiB each, well under 1 MB. The bound (24 MiB of growth of
    # the peak, VmHWM) leaves room for thread stacks and allocator noise.
    ext = start_extension(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
    payload = flood_request()
    before = vm_hwm_kib(ext.proc.pid)
    answers = [None] * 16

    def one(i):
        answers[i] = _flood(ext.port, payload)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a flood never finished"
    after = vm_hwm_kib(ext.proc.pid)
    for answer in answers:
        if answer is not None:
            assert_431(answer)
    assert ext.get("/ping", token=None)[0] == 200
    grown_mib = (after - before) / 1024
    assert grown_mib < 24, f"peak RSS grew by {grown_mib:.1f} MiB for 16 header floods"


# ------------------------------------------------------- header hygiene


def _token_case(token, case):
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    return {
        "right-then-wrong": [f"{TOKEN_HEADER}: {token}", f"{TOKEN_HEADER}: {wrong}"],
        "wrong-then-right": [f"{TOKEN_HEADER}: {wrong}", f"{TOKEN_HEADER}: {token}"],
        "right-twice": [f"{TOKEN_HEADER}: {token}", f"{TOKEN_HEADER}: {token}"],
        "right-then-lower-case-wrong": [f"{TOKEN_HEADER}: {token}",
                                        f"{TOKEN_HEADER.lower()}: {wrong}"],
    }[case]


@pytest.mark.parametrize("case", ["right-then-wrong", "wrong-then-right", "right-twice",
                                  "right-then-lower-case-wrong"])
def test_repeated_token_header_is_400(ext, fake, case):
    calls = fake.calls()
    answer = exchange(ext.port, request(GOOD + "&refreshNow=true", _token_case(ext.token, case)),
                      close_wait=0.2)
    assert answer.status == 400, answer
    assert answer.error_type() == "RepeatedHeader"
    assert ext.token.encode() not in answer.body
    assert fake.calls() == calls


@pytest.mark.parametrize("line", ["X-Forwarded-For : 1.2.3.4", "Transfer-Encoding : chunked",
                                  "X-Custom\t: x"],
                         ids=["x-forwarded-for", "transfer-encoding", "tab"])
def test_space_before_colon_is_malformed(ext, fake, line):
    # http.server's parser (the email package) takes such a line for the end of the
    # headers and drops it and everything after it: the X-Forwarded-For check, or the
    # Transfer-Encoding framing, would silently not apply.
    calls = fake.calls()
    answer = exchange(ext.port, request(GOOD + "&refreshNow=true", [line], token=ext.token))
    assert answer.status == 400, answer
    assert answer.error_type() == "MalformedHeader"
    assert answer.closed, "the connection stayed open after a malformed header"
    assert fake.calls() == calls


@pytest.mark.parametrize("fold", [" folded", "\tfolded"], ids=["space", "tab"])
def test_obs_fold_is_malformed(ext, fake, fold):
    calls = fake.calls()
    answer = exchange(ext.port, request(GOOD + "&refreshNow=true", ["X-Note: a", fold],
                                        token=ext.token))
    assert answer.status == 400, answer
    assert answer.error_type() == "MalformedHeader"
    assert answer.closed
    assert fake.calls() == calls


@pytest.mark.parametrize("value", ["for=1.2.3.4", 'for="[2001:db8::1]";proto=http'])
def test_forwarded_header_is_refused(ext, fake, value):
    calls = fake.calls()
    answer = exchange(ext.port, request(GOOD + "&refreshNow=true", [f"Forwarded: {value}"],
                                        token=ext.token), close_wait=0.2)
    assert answer.status == 400, answer
    assert answer.error_type() == "ForwardedRequestRefused"
    assert fake.calls() == calls


# ------------------------------------------------------- what logs and errors echo


def _log_after(ext, before, marker, timeout=5.0):
    """The log text written since ``before`` characters, once it holds ``marker``."""

    def written():
        text = ext.stderr()[before:]
        return text if marker in text else None

    return wait_for(written, timeout=timeout, message=f"a log line with {marker!r}")


def test_control_characters_of_a_path_are_refused_and_never_logged(ext):
    # A target is visible ASCII only (RFC 9112 section 3.2): ESC is refused by the grammar,
    # before anything (the log included) sees the path.
    before = len(ext.stderr())
    answer = exchange(ext.port, b"GET /zq\x1b[31mzq HTTP/1.1\r\nHost: x\r\n"
                      + f"{TOKEN_HEADER}: {ext.token}\r\n\r\n".encode(), close_wait=0.2)
    assert (answer.status, answer.error_type(), answer.closed) == (400, "BadRequest", True), answer
    exchange(ext.port, request("/marker-after-control-path", token=ext.token), close_wait=0.2)
    logged = _log_after(ext, before, "marker-after-control-path")
    assert "\x1b" not in logged and "zq" not in logged, logged
    assert "refused a malformed request: 400 BadRequest" in logged, logged


def test_control_characters_of_a_query_key_never_reach_the_log(ext, fake):
    before = len(ext.stderr())
    calls = fake.calls()
    for query in ("?na\x1bme=x", "?na%1Bme=x", "?name=x&k\x07ey=1"):
        sock_answer = exchange(ext.port, request("/systemsmanager/parameters/get" + query,
                                                 token=ext.token), close_wait=0.2)
        assert sock_answer.status == 400, (query, sock_answer)
    # A request after them, to know their log lines are all written.
    exchange(ext.port, request("/marker-after-control-keys", token=ext.token), close_wait=0.2)
    logged = _log_after(ext, before, "marker-after-control-keys")
    assert "\x1b" not in logged and "\x07" not in logged, logged
    assert fake.calls() == calls


def test_unknown_query_key_is_cut_to_16_characters(ext):
    before = len(ext.stderr())
    key = "abcdefghijklmnopqrstuvwxyz"
    status, _, body = ext.get(f"/systemsmanager/parameters/get?{key}=1&name=x")
    assert status == 400, body
    parsed = json.loads(body)
    assert parsed["__type"] == "UnknownQueryKey"
    # What follows a ';' is the hint naming the known keys (docs/http-api.md, "Query strings"), not pinned here.
    assert parsed["message"].split(";")[0] == "unknown query key 'abcdefghijklmnop\u2026'"
    assert "abcdefghijklmnopq" not in parsed["message"]
    exchange(ext.port, request("/marker-after-long-key", token=ext.token), close_wait=0.2)
    logged = _log_after(ext, before, "marker-after-long-key")
    assert "abcdefghijklmnopq" not in logged, logged


def _token_keys(token):
    return {
        "the-token": token,
        "contains-the-token": "x" + token + "y",
        "starts-inside-the-token": token[4:20] + "-and-more",
    }


@pytest.mark.parametrize("case", ["the-token", "contains-the-token", "starts-inside-the-token"])
def test_query_key_like_the_token_is_never_echoed(ext, case):
    key = _token_keys(ext.token)[case]
    before = len(ext.stderr())
    status, _, body = ext.get(f"/systemsmanager/parameters/get?name=x&{key}=1")
    assert status == 400, body
    parsed = json.loads(body)
    assert parsed == {"__type": "TokenInQuery", "message": "a query key or value holds the request token; it is "
                                                           "never sent to AWS nor echoed (is an argument swapped?)"}
    assert ext.token not in body.decode() and key[:16] not in body.decode()
    exchange(ext.port, request("/marker-after-token-key", token=ext.token), close_wait=0.2)
    logged = _log_after(ext, before, "marker-after-token-key")
    assert key[:16] not in logged, logged
    assert ext.token not in logged, "the request token was logged"


# ------------------------------------------------------- ::1 port taken


def _has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="the host has no ::1")
def test_port_taken_on_ipv6_loopback_fails_start(fake, start_extension):
    # Another process's listener on [::1]:PORT would receive every caller whose
    # "localhost" resolves to ::1 first: the extension must not start beside it.
    for _ in range(5):
        squatter = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        squatter.bind(("::1", 0))
        port = squatter.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", port))  # free on IPv4: only ::1 is taken
            break
        except OSError:
            squatter.close()
    else:
        pytest.skip("found no port free on 127.0.0.1 and bindable on ::1")
    squatter.listen(1)
    try:
        ext = start_extension(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": port},
                              wait=None)
        try:
            code = ext.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 2, (f"the extension did not exit (code {code}) with [::1]:{port} taken:"
                           f"\n{ext.stderr()}")
        assert f"port {port} on ::1 is already in use" in ext.stderr(), ext.stderr()
    finally:
        squatter.close()


# ------------------------------------------------------- relative URI


class Sniffer:
    """A listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _pings(ext):
    try:
        return ext.get("/ping", token=None, timeout=1)[0] == 200
    except OSError:
        return False


def test_relative_uri_not_starting_with_slash_is_refused(fake, start_extension):
    # The SDKs build http://169.254.170.2 + the relative URI: "@127.0.0.1:PORT/creds"
    # turns the link-local address into user information and sends the container
    # authorization token to 127.0.0.1:PORT instead.
    relative = "@127.0.0.1:{port}/creds"
    sniffer = Sniffer()
    try:
        env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": relative.format(port=sniffer.port),
               "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-token"}
        ext = start_extension(fake.url, env=env, wait=None)
        deadline = time.monotonic() + 10
        while ext.proc.poll() is None and not _pings(ext):
            assert time.monotonic() < deadline, "neither exited nor served within 10 s"
            time.sleep(0.05)
        if ext.proc.poll() is None:
            # It started: a request is what would make it fetch the credentials.
            ext.get(GOOD, timeout=10)
        assert sniffer.accepted == 0, (
            f"the extension connected to 127.0.0.1:{sniffer.port}, where "
            f"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI={relative.format(port=sniffer.port)!r} "
            "pointed it")
        assert ext.proc.poll() == 2, f"the extension started:\n{ext.stderr()}"
        assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in ext.stderr(), ext.stderr()
    finally:
        sniffer.close()


# ------------------------------------------------------- endpoint URL with a password


@pytest.mark.parametrize("url", ["ftp://user:pa55word@host", "http://user:pa55word@"])
def test_bad_endpoint_url_is_refused_without_its_password(start_extension_raw, url):
    ext = start_extension_raw(url)
    assert ext.proc.returncode == 2, ext.stderr()
    logs = ext.logs()
    assert logs.strip(), "start-up failed without saying why"
    assert "pa55word" not in logs, logs
    assert "user:" not in logs, logs
