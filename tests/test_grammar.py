"""The HTTP grammar (extension.py, "HTTP/1.1"), case by case: the answers an upstream sent
that the outbound parser once took and now refuses (issue 17's table), the framings of
the valid side it must keep reading, what the client refuses to send, and /register read
by its framing. In process: an answer is bytes a peer sent (then closed), read by
extension.exchange exactly as from a socket. tests/test_fuzz.py compares the same
grammar with h11 on generated inputs; tests/test_transport.py holds the request side.
"""

import io
import re
import socket
import threading
import time

import pytest

import extension


class Peer:
    """A socket whose peer sent ``data`` and closed: what is sent to it is kept in ``sent``."""

    def __init__(self, data):
        self.data = io.BytesIO(data)
        self.sent = b""

    def recv(self, size):
        return self.data.read(size)

    def sendall(self, data):
        self.sent += data

    def settimeout(self, timeout):
        pass


def answer(data, method="GET", cap=extension.MAX_ANSWER_BYTES):
    """(status, body, reusable, fields) of the answer ``data`` to one request."""
    connection = extension.HttpStream(Peer(data))
    status, body, reusable = extension.exchange(connection, method, "/", [("Host", "aws")], None, None, cap)
    return status, body, reusable, connection.headers


def refusal(data):
    with pytest.raises(extension.HttpProtocolError) as caught:
        answer(data)
    return str(caught.value)


OK_HEAD = b"HTTP/1.1 200 OK\r\n"

# Issue 17's table: each was once accepted (the chunk sizes by int(line, 16), the
# second Content-Length by a dict, "2000" by its first three digits, any coding holding
# "chunked" as chunked); each is refused now.
REFUSED = {
    "chunk-size-0x5": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-plus-5": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-0_5": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-spaced": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n 5 \r\nhello\r\n0\r\n\r\n",
    "content-length-and-chunked": OK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"5\r\nhello\r\n0\r\n\r\n",
    "two-content-lengths": OK_HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "space-before-colon": OK_HEAD + b"Content-Length : 5\r\n\r\nhello",
    "status-2000": b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello",
    "coding-xchunkedx": OK_HEAD + b"Transfer-Encoding: xchunkedx\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "coding-gzip-chunked": OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # And their kin.
    "coding-twice": OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "content-length-list": OK_HEAD + b"Content-Length: 5, 5\r\n\r\nhello",
    "content-length-signed": OK_HEAD + b"Content-Length: +5\r\n\r\nhello",
    "content-length-19-digits": OK_HEAD + b"Content-Length: 0000000000000000005\r\n\r\nhello",
    "status-two-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n",
    "status-without-reason-space": b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    "status-two-spaces": b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "version-2": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "version-lower-case": b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bare-cr-in-a-value": OK_HEAD + b"X-A: b\rc\r\nContent-Length: 0\r\n\r\n",
    "bare-cr-line-end": OK_HEAD + b"X-A: b\rContent-Length: 0\r\n\r\n",
    "nul-in-a-value": OK_HEAD + b"X-A: b\x00c\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": OK_HEAD + b"X-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "chunk-line-bare-lf": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk-data-longer": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello!\r\n0\r\n\r\n",
    "chunk-size-17-digits": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n",
    "trailer-content-length": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
    "switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK_HEAD
                           + b"Content-Length: 0\r\n\r\n",
    "interim-with-bad-framing": b"HTTP/1.1 103 Early Hints\r\nContent-Length: x\r\n\r\n" + OK_HEAD
                                + b"Content-Length: 0\r\n\r\n",
    "over-cap-declared": OK_HEAD + b"Content-Length: %d\r\n\r\n" % (extension.MAX_ANSWER_BYTES + 1),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_answer_the_grammar_refuses(case):
    refusal(REFUSED[case])


def test_refusals_never_quote_the_answer():
    # The message reaches the log and the caller's 502 detail: it names the rule broken,
    # never bytes of an answer that might hold a value.
    for case, data in REFUSED.items():
        message = refusal(data)
        assert "hello" not in message and "xchunkedx" not in message and "gzip" not in message, (case, message)


# The valid side: (bytes sent, (status, body, reusable)).
READ = {
    "content-length": (OK_HEAD + b"Content-Length: 5\r\n\r\nhello", (200, b"hello", True)),
    "content-length-05": (OK_HEAD + b"Content-Length: 05\r\n\r\nhello", (200, b"hello", True)),
    "content-length-repeated-alike": (OK_HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                                      (200, b"hello", True)),
    "chunked": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", (200, b"hello", True)),
    "Chunked-any-case": (OK_HEAD + b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                         (200, b"hello", True)),
    "chunk-extensions": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5;a=1;b=\"x y\"\r\nhello\r\n0;z\r\n\r\n",
                         (200, b"hello", True)),
    "trailers": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\nX-B: 2\r\n\r\n",
                 (200, b"hello", True)),
    "one-byte-chunks": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                        + b"".join(b"1\r\n%c\r\n" % byte for byte in b"hello") + b"0\r\n\r\n", (200, b"hello", True)),
    "hex-chunk-size": (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0000A\r\n0123456789\r\n0\r\n\r\n",
                       (200, b"0123456789", True)),
    "empty-reason": (b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", (200, b"ok", True)),
    "reason-with-spaces": (b"HTTP/1.1 404 Not Found Here\r\nContent-Length: 2\r\n\r\nno", (404, b"no", True)),
    "http-1.0-with-length": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", False)),
    "http-1.0-to-the-end": (b"HTTP/1.0 200 OK\r\n\r\nto end", (200, b"to end", False)),
    "no-framing-to-the-end": (OK_HEAD + b"X-A: b\r\n\r\nto end", (200, b"to end", False)),
    "connection-close": (OK_HEAD + b"Connection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
                         (200, b"ok", False)),
    "tabs-in-values": (OK_HEAD + b"X-A:\tb\tc\t\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", True)),
    "bare-lf-head": (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", (200, b"ok", True)),
    "no-body-204": (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", (204, b"", True)),
    # An interim answer is read past (RFC 9110 section 15.2), and the connection kept in step.
    "interim-103": (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
                    + OK_HEAD + b"Content-Length: 2\r\n\r\nok", (200, b"ok", True)),
    "exactly-at-the-cap": (OK_HEAD + b"Content-Length: 10\r\n\r\n0123456789", (200, b"0123456789", True)),
}


@pytest.mark.parametrize("case", sorted(READ))
def test_an_answer_the_grammar_reads(case):
    data, expected = READ[case]
    assert answer(data, cap=10)[:3] == expected


def test_the_answers_fields_are_kept_in_order_values_trimmed():
    data = OK_HEAD + b"X-Amzn-RequestId:  r-1 \r\nx-a: 1\r\nX-A:\t\t2\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
    assert answer(data)[3] == [("x-amzn-requestid", "r-1"), ("x-a", "1"), ("x-a", "2"), ("x-empty", ""),
                               ("content-length", "0")]


def test_an_answer_to_head_has_no_body_whatever_it_says():
    assert answer(OK_HEAD + b"Content-Length: 5\r\n\r\n", method="HEAD")[:3] == (200, b"", True)


@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
                                  OK_HEAD + b"Content-Length: 5\r\n\r\nhel",
                                  OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"])
def test_an_answer_cut_short_is_a_connection_error(data):
    # Not refused by the grammar: the upstream went away (UpstreamUnreachable, retried).
    with pytest.raises(ConnectionError):
        answer(data)


CAP = 100000


@pytest.mark.parametrize("framing", [b"Content-Length: %d" % (CAP + 1), b"Transfer-Encoding: chunked", b""])
def test_over_the_cap_is_refused_and_no_more_is_received(framing):
    head = OK_HEAD + (framing + b"\r\n" if framing else b"") + b"\r\n"
    body = b"%x\r\n" % (CAP + 1) + b"b" * (CAP + 1) if b"chunked" in framing else b"b" * (CAP + 1)
    peer = Peer(head + body + b"x" * 300000)
    with pytest.raises(extension.HttpProtocolError, match=f"(at most|over) {CAP}"):
        extension.exchange(extension.HttpStream(peer), "GET", "/", [("Host", "aws")], None, None, CAP)
    # A declared length or a chunk size over the cap is refused before the body is read
    # (the status line's read may have brought up to 64 KiB); framed by the end of the
    # connection, cap + 1 bytes of body are received, no more.
    assert peer.data.tell() == (len(head) + CAP + 1 if not framing else extension.MAX_START_LINE)


# ------------------------------------------------------------------ what is sent


@pytest.mark.parametrize("headers", [
    [("Authorization", "token\r\nX-Injected: 1")], [("Authorization", "token\nX")], [("Authorization", "a\x00b")],
    [("Authorization", "a\x7fb")], [("Authorization", "\u20ac")], [("Bad Name", "v")], [("X-A\r\nB", "v")],
], ids=["crlf", "lf", "nul", "del", "not-latin-1", "space-in-name", "crlf-in-name"])
def test_a_header_that_cannot_be_sent_is_refused_before_a_byte_is(headers):
    peer = Peer(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    with pytest.raises(ValueError, match=re.escape(f"the header {headers[0][0]!r}")) as caught:
        extension.exchange(extension.HttpStream(peer), "GET", "/", [("Host", "aws")] + headers, None, None)
    assert peer.sent == b""
    assert "token" not in str(caught.value) and "Injected" not in str(caught.value)


@pytest.mark.parametrize("target", ["/a b", "/a\r\nX: 1", "/\u00e9"])
def test_a_target_that_cannot_be_sent_is_refused_before_a_byte_is(target):
    peer = Peer(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    with pytest.raises(ValueError, match="target"):
        extension.exchange(extension.HttpStream(peer), "GET", target, [("Host", "aws")], None, None)
    assert peer.sent == b""


def test_a_request_is_sent_as_one_buffer_with_its_length():
    peer = Peer(OK_HEAD + b"Content-Length: 0\r\n\r\n")
    extension.exchange(extension.HttpStream(peer), "POST", "/", [("Host", "aws"), ("X-A", "b\tc")], b"{}", None)
    assert peer.sent == b"POST / HTTP/1.1\r\nHost: aws\r\nX-A: b\tc\r\nContent-Length: 2\r\n\r\n{}"


# ------------------------------------------------------------------ /register


def test_register_reads_the_answer_by_its_framing_not_until_the_close():
    # A Runtime API that keeps the connection open after its answer: once held every cold
    # start for REGISTER_TIMEOUT_SECONDS (10 s), /register returns as soon as the body is in.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        done = threading.Event()

        def lambda_api():
            connection, _ = server.accept()
            with connection:
                request = b""
                while b"\r\n\r\n" not in request or not request.endswith(extension.REGISTER_BODY):
                    request += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: id-1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                done.wait(10)  # open until the test ends

        threading.Thread(target=lambda_api, daemon=True).start()
        started = time.monotonic()
        try:
            assert extension.register(f"127.0.0.1:{server.getsockname()[1]}", "name", timeout=5) == (200, "id-1", b"{}")
        finally:
            done.set()
        assert time.monotonic() - started < 1.0


def test_register_refuses_an_answer_the_grammar_refuses():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def lambda_api():
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}")

        threading.Thread(target=lambda_api, daemon=True).start()
        with pytest.raises(extension.HttpProtocolError):
            extension.register(f"127.0.0.1:{server.getsockname()[1]}", "name", timeout=5)
