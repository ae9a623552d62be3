"""The HTTP grammar (extension.py, "HTTP/1.1") and the query parser, fuzzed.

The request parser (read_request) and the answer parser (exchange: status line, fields,
framing, chunked bodies) are compared with h11, the reference HTTP/1.1 parser in Python,
on generated heads and answers (each built from pieces that are right, wrong or odd, then
maybe mutated byte by byte):

* anything h11 refuses, the extension never accepts;
* anything both accept, both read the same: method, target and version, or status; the
  fields as (lower-case name, value) in order; the body; whether the connection may be
  reused;
* the extension's parsers raise nothing but HttpProtocolError (refused) or
  ConnectionError (the bytes ended first), whatever they are given.

The extension may refuse what h11 accepts: it is stricter on purpose (a control
character in a value, a folded line, a status line without the space before its reason,
Content-Length with Transfer-Encoding, a chunk line with trailing white space...;
tests/test_grammar.py lists them). One difference runs the other way, by the RFC: a
server ignores one empty line before a request line (RFC 9112 section 2.2), which h11
refuses, so h11 is given the request without it. Policy that is not grammar (the token,
X-Forwarded-For, Forwarded: Service.answer's) is not generated at all.

The query parser has no reference: its own properties are checked (it raises nothing but
ClientError, gives back quote()-encoded pairs exactly, and lets no control character
(C0, DEL, C1) out, as docs/http-api.md says).

Bounded for CI: FUZZ_EXAMPLES examples per parser (default 3000, about 35 s in all), a fixed seed
(derandomize), no example database; `python3 tools/dev.py fuzz --examples N` runs more,
on new inputs each time.
"""

import io
import os
from collections import Counter
from urllib.parse import quote

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import extension

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3000"))
# The suite's run has a fixed seed; tools/dev.py fuzz sets FUZZ_RANDOM for new inputs on
# every run (a failure then prints the @reproduce_failure that replays it).
FUZZ = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))

REFUSED, CUT = "refused", "cut short"

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = bytes(range(0x21, 0x7F))
# Bytes at the edges of the rules: controls, white space, separators, obs-text.
ODD = b"\x00\x01\t\x0b\x0c\r\n \x7f\x80\xe9\xff\":;,()/@=?{}[]\\"


def made_of(common, odd=ODD, min_size=0, max_size=12):
    """Bytes from common, with some from odd now and then (none if odd is empty)."""
    alphabet = [bytes([b]) for b in common] * 8 + [bytes([b]) for b in odd]
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(b"".join)


class Odd:
    """Which one piece of a message is drawn from the unusual ones: the slot-th piece asked
    for (none when the message has fewer). One deviation at a time from a message that is
    right makes the comparison sharp; mutated() adds several."""

    def __init__(self, slot):
        self.slot, self.asked = slot, -1

    def __call__(self):
        self.asked += 1
        return self.asked == self.slot


def pick(odd, usual, unusual=()):
    """One of the usual pieces, or, for the odd one, of the unusual (a list, or a strategy)."""
    if odd() and (isinstance(unusual, st.SearchStrategy) or unusual):
        return unusual if isinstance(unusual, st.SearchStrategy) else st.sampled_from(unusual)
    return st.sampled_from(usual)


def mutated(data_strategy):
    """The bytes, most often as they are, else with one to three bytes inserted, dropped
    or replaced."""

    @st.composite
    def mutate(draw):
        data = draw(data_strategy)
        for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]))):
            at = draw(st.integers(0, len(data)))
            byte = draw(st.sampled_from([bytes([b]) for b in ODD + b"0aZ9 -"]))
            how = draw(st.sampled_from(["insert", "drop", "replace"]))
            data = data[:at] + (b"" if how == "drop" else byte) + data[at + (how != "insert"):]
        return data

    return mutate()


def line_end(odd):
    return pick(odd, [b"\r\n", b"\r\n", b"\r\n", b"\n"], [b"\r", b"\n\r", b"\r\r\n"])


@st.composite
def field(draw, odd, framing=False):
    name = draw(pick(odd, [b"Accept", b"Connection", b"X-Amzn-RequestId", b"Content-Type", b"X-A", b"x-a"],
                     st.sampled_from([b"Content-Length", b"Transfer-Encoding"]) | made_of(TCHAR) if framing
                     else made_of(TCHAR)))
    separator = draw(pick(odd, [b": ", b":", b":\t", b":  "], [b" : ", b" :", b"::", b""]))
    value = draw(pick(odd, [b"close", b"keep-alive", b"Keep-Alive, Close", b"application/json", b"5", b"",
                            b"a\tb  c", b"\x80\xe9", b"a=1, b=\"x y\""], made_of(VCHAR + b" \t\x80\xe9")))
    fold = draw(pick(odd, [b""], [b"\r\n folded", b"\r\n\tfolded"]))
    return name + separator + value + fold


FRAMINGS = [[], [], [], [b"Content-Length: 0"], [b"Content-Length: 5"], [b"Content-Length: 05"],
            [b"content-length:5"], [b"Content-Length: 5", b"Content-Length: 5"], [b"Transfer-Encoding: chunked"],
            [b"Transfer-Encoding: chunked"], [b"Transfer-Encoding: Chunked"]]
BAD_FRAMINGS = [
    [b"Content-Length: -5"], [b"Content-Length: +5"], [b"Content-Length: 5, 5"], [b"Content-Length: 0x5"],
    [b"Content-Length: 5", b"Content-Length: 6"], [b"Content-Length: " + b"9" * 25], [b"Content-Length: 5 5"],
    [b"Transfer-Encoding: gzip, chunked"], [b"Transfer-Encoding: xchunkedx"], [b"Transfer-Encoding: chunked, "],
    [b"Transfer-Encoding: chunked", b"Content-Length: 5"], [b"Transfer-Encoding: chunked"] * 2,
]


@st.composite
def head_lines(draw, odd, first_line, hosts, bad_hosts):
    lines = (draw(st.lists(field(odd), max_size=4)) + draw(pick(odd, hosts, bad_hosts))
             + draw(pick(odd, FRAMINGS, BAD_FRAMINGS)))
    lines = draw(st.permutations(lines))
    return b"".join(line + draw(line_end(odd)) for line in [first_line] + lines) + draw(
        pick(odd, [b"\r\n", b"\r\n", b"\n"], [b""]))


@st.composite
def request_heads(draw):
    odd = Odd(draw(st.integers(0, 24)))
    method = draw(pick(odd, [b"GET", b"GET", b"HEAD", b"POST", b"OPTIONS", b"M-SEARCH"], made_of(TCHAR)))
    target = draw(pick(odd, [b"/ping", b"/", b"*", b"/a?b=c&d=%2F", b"http://localhost:2773/p?q=1",
                             b"/secretsmanager/get?secretId=a+b@c~"], made_of(VCHAR).map(lambda path: b"/" + path)))
    version = draw(pick(odd, [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"],
                        [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"http/1.1", b"HTTP/1", b"HTTP/1.x", b""]))
    space = pick(odd, [b" "], [b"  ", b"\t", b""])
    line = method + draw(space) + target + draw(space) + version
    hosts = [[b"Host: localhost"], [b"host:localhost:2773"], [b"Host:"]] + ([[]] if version == b"HTTP/1.0" else [])
    head = draw(head_lines(odd, line, hosts, [[], [b"Host: a", b"Host: b"], [b"Host: a", b"Host: a"]]))
    return draw(pick(odd, [b"", b"", b"\r\n", b"\n"], [b"\r\n\r\n", b" \r\n"])) + head


@st.composite
def chunked_body(draw, odd):
    chunks = draw(st.lists(st.binary(min_size=1, max_size=6), max_size=4))
    body = b""
    for data in chunks + [b""]:
        size = draw(pick(odd, [b"%x", b"%x", b"%X", b"0%x", b"%016x"],
                         [b"%017x", b"0x%x", b"+%x", b" %x", b"%x ", b"%x\t", b"-%x"])) % len(data)
        extensions = draw(pick(odd, [b"", b"", b";a=1", b";a", b";a=\"x y\"", b";", b";a\tb"],
                               [b" ;a", b";\x01", b";a\rb"]))
        body += size + extensions + draw(pick(odd, [b"\r\n"], [b"\n", b"\r"]))
        if data:
            body += data + draw(pick(odd, [b"\r\n"], [b"\n", b"", b"x\r\n"]))
    trailers = draw(st.lists(field(odd, framing=True), max_size=2))
    return body + b"".join(line + draw(line_end(odd)) for line in trailers) + draw(line_end(odd))


@st.composite
def answers(draw):
    odd = Odd(draw(st.integers(0, 30)))
    version = draw(pick(odd, [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"],
                        [b"HTTP/2.0", b"HTTP/1.10", b"http/1.1", b""]))
    status = draw(pick(odd, [b"200", b"200", b"204", b"304", b"404", b"500", b"599"],
                       [b"2000", b"20", b"099", b"600", b"999", b"2x0", b"000", b"101"]))
    reason = draw(pick(odd, [b" OK", b" OK", b" ", b" Not Found", b" a\tb", b" \x80\xe9"],
                       [b"", b" \x01", b"  OK", b"\tOK"]))
    interim = draw(pick(odd, [b"", b"", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                              b"HTTP/1.1 100 Continue\r\n\r\n"]))
    head = draw(head_lines(odd, version + b" " + status + reason, [[]], []))
    if b"transfer-encoding" in head.lower():
        body = draw(chunked_body(odd))
    elif b"length: 5" in head.lower() or b"length:5" in head.lower() or b"length: 05" in head.lower():
        body = draw(pick(odd, [b"hello", b"hello", b"he\r\nl"], [b"hell", b"hello!"]))
    else:
        body = draw(st.binary(max_size=12))
    return interim + head + body


class Peer:
    """A socket whose peer sent data and then closed; what is sent to it is dropped."""

    def __init__(self, data):
        self.data = io.BytesIO(data)

    def recv(self, size):
        return self.data.read(size)

    def sendall(self, data):
        pass

    def settimeout(self, timeout):
        pass


def fields_read(fields):
    """Fields as h11 gives them: bytes, Transfer-Encoding's value in lower case, and one
    Content-Length of several (the grammar has checked that they agree)."""
    read = []
    for name, value in fields:
        if name != "content-length" or ("content-length", value.encode("latin-1")) not in read:
            read.append((name, (value.lower() if name == "transfer-encoding" else value).encode("latin-1")))
    return read


def ours_request(data):
    try:
        method, target, version, headers = extension.read_request(extension.HttpStream(Peer(data)))
    except extension.HttpProtocolError:
        return REFUSED
    except ConnectionError:
        return CUT
    return method, target, version, fields_read(headers)


def h11_request(data):
    data = data[2:] if data.startswith(b"\r\n") else data[1:] if data.startswith(b"\n") else data
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=10 ** 6)
    connection.receive_data(data)
    connection.receive_data(b"")
    try:
        event = connection.next_event()
    except h11.ProtocolError:
        return REFUSED
    if not isinstance(event, h11.Request):
        return CUT
    return (event.method.decode("ascii"), event.target.decode("ascii"), "HTTP/" + event.http_version.decode("ascii"),
            [(name.decode("ascii"), value) for name, value in event.headers])


def ours_answer(data):
    connection = extension.HttpStream(Peer(data))
    try:
        status, body, reusable = extension.exchange(connection, "GET", "/", [("Host", "x")], None, None)
    except extension.HttpProtocolError:
        return REFUSED
    except ConnectionError:
        return CUT
    return status, fields_read(connection.headers), body, reusable


def h11_answer(data):
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=10 ** 6)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    connection.receive_data(b"")
    head, body = None, b""
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # read past, as by the extension
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                # h11 is DONE after a body that the end of the connection framed too, but
                # such a connection has ended: not reused.
                framed = head.status_code in (204, 304) or any(
                    name in (b"content-length", b"transfer-encoding") for name, _ in head.headers)
                return (head.status_code, [(n.decode("ascii"), v) for n, v in head.headers], body,
                        connection.their_state is h11.DONE and framed)
            else:
                return CUT
    except h11.ProtocolError:
        return REFUSED


def compare(ours, theirs, data, seen):
    """Check one input's two readings; count what happened."""
    if ours in (REFUSED, CUT):
        seen["ours refuses, h11 " + ("refuses" if theirs in (REFUSED, CUT) else "accepts")] += 1
        return
    assert theirs not in (REFUSED, CUT), f"accepted what h11 refuses ({theirs}): {data!r} read as {ours!r}"
    assert ours == theirs, f"read otherwise than h11: {data!r}\nours: {ours!r}\nh11:  {theirs!r}"
    seen["both accept"] += 1


def check_counts(seen):
    # The generators reach both sides: a fuzzer whose inputs all fail early checks nothing.
    assert seen["both accept"] >= EXAMPLES // 10, seen
    assert seen["ours refuses, h11 refuses"] >= EXAMPLES // 10, seen


def test_request_heads_against_h11():
    seen = Counter()

    @FUZZ
    @given(mutated(request_heads()))
    def check(data):
        compare(ours_request(data), h11_request(data), data, seen)

    check()
    check_counts(seen)


def test_answers_against_h11():
    seen = Counter()

    @FUZZ
    @given(mutated(answers()))
    def check(data):
        compare(ours_answer(data), h11_answer(data), data, seen)

    check()
    check_counts(seen)


CONTROLS = "".join(map(chr, range(0x20))) + "".join(map(chr, range(0x7f, 0xa0)))  # and C1
QUERY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=CONTROLS), max_size=12)


def test_the_query_parser_round_trips_encoded_pairs():
    @FUZZ
    @given(st.lists(st.tuples(QUERY_TEXT, QUERY_TEXT), max_size=5))
    def check(pairs):
        query = "&".join(f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in pairs)
        assert extension.parse_query(query) == pairs

    check()


def test_the_query_parser_refuses_cleanly_and_lets_no_control_character_out():
    seen = Counter()

    @FUZZ
    @given(st.one_of(st.text(max_size=20),
                     st.lists(st.tuples(QUERY_TEXT, QUERY_TEXT), max_size=3).map(
                         lambda pairs: "&".join(quote(k, safe="") + "=" + quote(v, safe="") for k, v in pairs)).flatmap(
                         lambda query: mutated(st.just(query.encode("latin-1"))).map(lambda b: b.decode("latin-1")))))
    def check(query):
        try:
            pairs = extension.parse_query(query)
        except extension.ClientError as error:
            assert error.status == 400 and error.error_type == "MalformedQuery", error
            seen["refused"] += 1
            return
        assert not any(c in CONTROLS for key, value in pairs for c in key + value), pairs
        seen["read"] += 1

    check()
    assert seen["refused"] >= EXAMPLES // 20 and seen["read"] >= EXAMPLES // 20, seen
