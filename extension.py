"""An open, auditable AWS Parameters and Secrets Lambda Extension, in one stdlib-only file.

What it does
    Serves SSM Parameter Store parameters and Secrets Manager secrets to the code of a
    Lambda function over HTTP on loopback, from a TTL + LRU cache in front of the AWS
    APIs, exactly where the AWS extension serves them, so that function code written for
    the AWS layer works unchanged. Python 3.9+, standard library only, no SDK.

Routes (loopback only: 127.0.0.1, and ::1 where the host has it; docs/http-api.md)
    GET /systemsmanager/parameters/get[/]?name=&version=|label=&withDecryption=&refreshNow=
                                         &jsonKey=&format=raw
    GET /secretsmanager/get[/]?secretId=&versionId=&versionStage=&refreshNow=&jsonKey=&format=raw
    GET /systemsmanager/parameters/get-by-path[/]?path=&recursive=&withDecryption=&refreshNow=
                                         GetParametersByPath, every page (at most 1,000 parameters)
    GET /systemsmanager/parameters/get-multiple[/]?names=a,b:3,c:prod&withDecryption=&refreshNow=
                                         GetParameters, 10 names a call (at most 50 names)
    GET /secretsmanager/batch-get[/]?secretIds=a,b&refreshNow=
                                         BatchGetSecretValue (at most 20 ids)
    GET /ping                                            200, no token needed (health check)
    Every route but /ping needs the header X-Aws-Parameters-Secrets-Token.
    Success: the AWS SDK's output shape as JSON, as the AWS extension answers, with the
    header X-Parameters-Secrets-Cache: hit | miss | stale | bypass. jsonKey answers one
    key of a JSON value; format=raw the value alone (text/plain, or the bytes of a binary
    secret). get-multiple and batch-get share /get's cache entries, item by item.
    Errors: {"__type": ..., "message": ...}; AWS's own errors keep AWS's status.

Environment (read once at start into the frozen Config; nothing reads os.environ afterwards;
docs/configuration.md)
    SSM_PARAMETER_STORE_TIMEOUT_MILLIS            0     Parameter Store budget per request (0 = none:
                                                        each attempt then ends after 10 s, throttles
                                                        are retried for 8 s, a path's pages end in 30 s)
    SECRETS_MANAGER_TIMEOUT_MILLIS                0     Secrets Manager budget per request (0 = none)
    SSM_PARAMETER_STORE_TTL                       300   seconds a parameter is cached (0 = bypass; max 3600)
    SECRETS_MANAGER_TTL                           300   seconds a secret is cached (0 = bypass; max 3600)
    PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED    TRUE  FALSE bypasses the cache
    PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE       1000  most cached items, 0-1000 (0 = bypass)
    PARAMETERS_SECRETS_EXTENSION_HTTP_PORT        2773  local port
    PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS  3     most connections to each AWS service
    PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL        info  debug | info | warn | error | none
    PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS 300  how long past expiry a value may be served
                                                        when AWS fails transiently (0 = never)
    PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS      64    most inbound connections at once; over it
                                                        the one idle longest is closed, else 429
    PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS 10000  a request that has begun must arrive
                                                        within this (silence) or twice this
                                                        (dripping); idle connections are kept
    PARAMETERS_SECRETS_EXTENSION_PREFETCH         ""    "ssm:<name>[?query] secret:<id>[?query]
                                                        ssm-path:<path>[?query] ...": fetched in
                                                        batches at start
    PARAMETERS_SECRETS_EXTENSION_METRICS          none  emf: also print the shutdown figures as one
                                                        CloudWatch Embedded Metric Format line
    PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD    0     percent of a TTL after which a hit also
                                                        refreshes the value in the background
                                                        (0-99; 0 = never)
    and the AWS SDK conventions: AWS_REGION / AWS_DEFAULT_REGION; AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; AWS_CONTAINER_CREDENTIALS_FULL_URI /
    _RELATIVE_URI with AWS_CONTAINER_AUTHORIZATION_TOKEN / _TOKEN_FILE; AWS_PROFILE,
    AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE; AWS_ENDPOINT_URL_SSM,
    AWS_ENDPOINT_URL_SECRETS_MANAGER, AWS_ENDPOINT_URL; AWS_USE_FIPS_ENDPOINT;
    AWS_LAMBDA_LOG_FORMAT (JSON: one JSON object per log line); AWS_LAMBDA_RUNTIME_API
    (set by Lambda: run the Extensions API lifecycle); AWS_LAMBDA_INITIALIZATION_TYPE
    (snap-start: the cache is dropped at the first event after INIT); AWS_TOKEN (the
    request token for runs outside Lambda, before AWS_SESSION_TOKEN and
    AWS_CONTAINER_AUTHORIZATION_TOKEN). The launcher (bootstrap) reads
    PARAMETERS_SECRETS_EXTENSION_PYTHON.

What it never does
    Listen beyond loopback (and its answers carry IP TTL 1); serve a request without the
    right token; log or echo a secret value, a parameter value or a token, at any level;
    cache an error; skip TLS verification; send the session token with credentials it does
    not belong to; wait without a deadline or read without a cap, but for Lambda's own
    /event/next, which blocks until Lambda has an event by design.

Reading guide (docs/audit.md: the same path with every definition named, and the test
that proves each rule of "What it never does")
    The trust boundary, in reading order: the early start (sockets on loopback, with IP
    TTL 1; /register); a request head (HTTP/1.1, one grammar for everything read: caps on
    lines and header bytes, a deadline once a request has begun); its query (Queries);
    the policy (Service.answer: method, forwarding headers, path, the token in constant
    time, a query holding the token; error_answer); the outbound exchange (one deadline
    and a 1 MiB cap per exchange, headers checked before they are sent, TLS verified) and
    what AWS answers (AWS answers: its shape, and the name asked); SigV4; credentials; log
    redaction (Logging: names and error types only, control characters escaped;
    Service._log_failure). The rest reads only what these have checked. Locks and the
    rule each keeps: docs/design.md, "Locks".

Layout (each section needs only the ones above it)
    HTTP/1.1        one grammar for every message read (requests, AWS's, the credentials
                    endpoint's and Lambda's answers), and the outbound client: one request
                    and answer under a deadline and a size cap
    Early start     before any other import: the listening sockets, and /register
                    (Lambda starts the function's runtime only once every extension has)
    Errors          every failure, and the one place it becomes an HTTP answer
    Configuration   the environment, read once into Config
    Logging         one line per event, control characters escaped, never a value
    SigV4           pure functions, one per step of AWS's signing process
    Credentials     environment, container endpoint, shared files
    AWS client      JSON 1.1 calls, connection pool, retries inside the budget
    AWS answers     shape checks, and the official extension's answer shapes
    Cache           TTL + LRU on two clocks, one AWS call per miss, refreshes ahead,
                    stale answers
    Queries         the query string read strictly, and what each route's keys take
    Lookups and batches  what a request reads (one value, a path, a batch) and the AWS
                    calls that read it; prefetch's and the wrapper's kinds of entry
    Lambda lifecycle  the Extensions API, and snapshot restores (the clocks, or Lambda)
    Service         what a request means and its answer; prefetch; a snapshot's drop
    HTTP server     the transport: sockets, answers, keep-alive, admission, the stop
    Values in environment variables  the layer's wrapper: {{ssm:...}} / {{secret:...}}
                    in the runtime's environment, resolved through the running extension
    main

Usage: python3 extension.py [NAME]    (NAME: the extension's name, for logs and /register)
       python3 extension.py --version     (prints the name and the version, e.g.
           "parameters-secrets-extension 1.0.0")
       python3 extension.py --exec-with-values COMMAND...   (the layer's wrapper: resolve the
           references in the environment through the running extension, then exec COMMAND;
           docs/env-values.md)
"""

# The release, in semantic versioning (CHANGELOG.md says what each one changed). One place:
# build_layer.sh reads this line for the zip's name; --version, the start-up line and the
# shutdown summary print it.
__version__ = "1.0.0"

import errno
import os
import select  # loaded with socket already (its selectors): free at start
import signal
import socket
import sys
import time

# ---------------------------------------------------------------------------
# HTTP/1.1: one grammar for every message read (callers' requests, the answers of AWS,
# of the credentials endpoint and of Lambda), and the outbound client
# ---------------------------------------------------------------------------
#
# One set of rules, read once (docs/design.md, "Transport"): RFC 9112 for the message,
# RFC 9110 for its fields, at least as strict as h11, the reference parser
# (tests/test_fuzz.py holds them to it; tests/test_grammar.py lists the cases). What the
# grammar refuses is an HttpProtocolError: a request refused so is answered 4xx or 505,
# an answer refused so is never used, nor is the connection it came on. The early start
# registers through this client, so this section needs nothing but what the early start
# may import (a token is checked with bytes.translate, not re).

MAX_START_LINE = 65536  # a request line or a status line, its line end included
# The field lines of one head, or a chunked body's trailers, each line end counted as two
# bytes. This API needs a token and a few standard headers: 32 KiB is plenty, and without
# a cap http.server-style parsing holds 100 x 64 KiB per request (docs/pitfalls.md).
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_LINES = 100
MAX_CHUNK_LINE = 1024  # a chunk size and its extensions
RECEIVE_BYTES = 65536  # the most one recv asks for
# AWS answers are small: a parameter value is at most 8 KB, a secret 64 KB; with the
# metadata well under 100 KB. Anything over this is refused unread (docs/pitfalls.md).
MAX_ANSWER_BYTES = 1024 * 1024
TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tchar
VCHAR = bytes(range(0x21, 0x7F))
# A field value (and a reason phrase, a chunk extension): VCHAR, obs-text, SP and HTAB,
# no other control character (RFC 9110 section 5.5): a CR or LF would end the line.
VALUE_BYTES = b"\t " + VCHAR + bytes(range(0x80, 0x100))


class HttpProtocolError(Exception):
    """Bytes the grammar refuses, or an answer over its cap. status and error_type: what a
    caller's request refused so is answered (400 BadRequest unless said)."""

    def __init__(self, message, status=400, error_type="BadRequest"):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def is_token(data):
    """RFC 9110 section 5.6.2: one or more tchar."""
    return bool(data) and not data.translate(None, TOKEN_BYTES)


def is_field_value(data):
    return not data.translate(None, VALUE_BYTES)


class HttpStream:
    """What was received from one peer (sock: anything with recv) and not taken yet
    (buffer), and the reads the grammar makes on it. Each read asks the socket for no more
    than the line, body or cap it reads: nothing past those is received. receive() is
    where a subclass bounds the wait. The end of the stream where more is needed is a
    ConnectionError."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def receive(self, size):
        """At most size more bytes; b"" at the end of the stream."""
        return self.sock.recv(size)

    def read_line(self, limit, too_long, crlf=False):
        """The next line, its end cut: CRLF, or a bare LF (RFC 9112 section 2.2) but where
        crlf (a chunk's framing: section 7.1; h11 agrees). A CR anywhere else is refused.
        HttpProtocolError(*too_long) when no line ends within limit bytes."""
        searched = 0
        while True:
            end = self.buffer.find(b"\n", searched, limit)
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 1:]
                if (crlf and not line.endswith(b"\r")) or b"\r" in line[:-1]:
                    raise HttpProtocolError("a line holds a CR that does not end it, or a chunk line has no CRLF")
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) >= limit:
                raise HttpProtocolError(*too_long)
            searched = len(self.buffer)
            self._more(limit - searched)

    def read(self, size, to_end=False):
        """The next size bytes; to_end: what comes until the peer closes, size at most."""
        while len(self.buffer) < size and self._more(size - len(self.buffer), to_end):
            pass
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _more(self, wanted, end_allowed=False):
        chunk = self.receive(min(RECEIVE_BYTES, wanted))
        if not (chunk or end_allowed):
            raise ConnectionError("the connection ended in the middle of a message")
        self.buffer += chunk
        return chunk


def read_fields(stream):
    """[(lower-case name, value)] of the field lines up to the empty line that ends them (a
    head's headers, or a chunked body's trailers), repeats kept in order. At most
    MAX_HEADER_LINES lines and MAX_HEADER_BYTES bytes: 431 HeadersTooLarge as soon as
    either is passed, and no read asks the socket for a byte past the byte cap. A line is
    a field: an RFC 9110 token, a colon right after it (RFC 9112 section 5.1: no white
    space before it; a folded line, which begins with white space, fails this too:
    section 5.2), a value, the white space around it cut."""
    fields = []
    size = 0
    while True:
        line = stream.read_line(MAX_HEADER_BYTES - size,
                                (f"the headers are larger than {MAX_HEADER_BYTES} bytes", 431, "HeadersTooLarge"))
        size += len(line) + 2
        if not line:
            return fields
        if len(fields) >= MAX_HEADER_LINES:
            raise HttpProtocolError(f"more than {MAX_HEADER_LINES} header lines", 431, "HeadersTooLarge")
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not (colon and is_token(name) and is_field_value(value)):
            raise HttpProtocolError("a header line is not 'Name: value'", 400, "MalformedHeader")
        fields.append((name.decode("ascii").lower(), value.decode("latin-1")))


def field_tokens(fields, name):
    """The comma-separated tokens of every field called name, in lower case."""
    return {token.strip().lower() for field, value in fields if field == name for token in value.split(",")}


def is_version(data):
    """HTTP-version: HTTP/DIGIT.DIGIT (RFC 9112 section 2.3)."""
    return len(data) == 8 and data[:5] == b"HTTP/" and data[6:7] == b"." and (data[5:6] + data[7:]).isdigit()


def body_framing(fields):
    """How the body after a head with these fields is framed (RFC 9112 section 6.3):
    ("chunked", None), ("length", n), or (None, None) when neither field is there.
    Transfer-Encoding is exactly chunked (in any case), the one coding of one field line;
    Content-Length is digits only, the same digits on every line; both at once are refused,
    as a sign of request smuggling (section 6.1). Else HttpProtocolError."""
    codings = [value for name, value in fields if name == "transfer-encoding"]
    lengths = {value for name, value in fields if name == "content-length"}
    if codings:
        if len(codings) > 1 or codings[0].lower() != "chunked" or lengths:
            raise HttpProtocolError("Transfer-Encoding is not 'chunked' alone, or comes with Content-Length")
        return "chunked", None
    if not lengths:
        return None, None
    length = lengths.pop()
    if lengths or not (length.isascii() and length.isdigit() and len(length) <= 18):
        raise HttpProtocolError("Content-Length is not one number")
    return "length", int(length)


def read_chunked(stream, cap):
    """The body of a chunked message (RFC 9112 section 7.1): a chunk size is 1 to 16 hex
    digits, right before the line end or a ';' whose chunk extensions are ignored (checked
    as a field value); a chunk's data ends with CRLF; the trailers are read as fields
    (bounded alike) and dropped, framing fields among them refused (RFC 9110 section
    6.5.1). HttpProtocolError past cap bytes, before the chunk that passes it is read."""
    parts = []
    size = 0
    while True:
        line = stream.read_line(MAX_CHUNK_LINE, ("a chunk size line is too long",), crlf=True)
        digits, _, extensions = line.partition(b";")
        if not (0 < len(digits) <= 16 and not digits.translate(None, b"0123456789ABCDEFabcdef")
                and is_field_value(extensions)):
            raise HttpProtocolError("a chunk size is not hex digits")
        chunk = int(digits, 16)
        if chunk == 0:  # the last chunk
            if body_framing(read_fields(stream)) != (None, None):
                raise HttpProtocolError("a trailer names the framing")
            return b"".join(parts)
        size += chunk
        if size > cap:
            raise HttpProtocolError(f"an answer over {cap} bytes")
        parts.append(stream.read(chunk))
        if stream.read(2) != b"\r\n":
            raise HttpProtocolError("a chunk does not end where its size says")


def read_request(stream):
    """(method, target, version, headers) of the next request on stream (an HttpStream),
    headers as [(lower-case name, value)], repeats kept. Raises HttpProtocolError, with the
    answer the request gets (400, 414, 431, 505), as soon as its head is known to be
    refused: the request line is method SP target SP HTTP-version, one space each, the
    target VCHAR only (RFC 9112 section 3; one empty line before it is skipped: section
    2.2), checked before the fields are read (HTTP/0.9, "GET /", sends none to wait for);
    then read_fields' rules, exactly one Host (or none, on HTTP/1.0: section 3.2) and
    body_framing's. Nothing is received past MAX_START_LINE bytes from the head's start,
    or past MAX_HEADER_BYTES after its request line, whichever is further."""
    too_long = (f"the request line is longer than {MAX_START_LINE} bytes", 414, "RequestLineTooLong")
    line = stream.read_line(MAX_START_LINE, too_long) or stream.read_line(MAX_START_LINE, too_long)
    method, _, rest = line.partition(b" ")
    target, _, version = rest.partition(b" ")
    if not (is_token(method) and target and not target.translate(None, VCHAR) and is_version(version)):
        raise HttpProtocolError("the request line is not 'METHOD target HTTP/1.1', one space apart, the target "
                                "visible ASCII (HTTP/0.9 is not served)")
    if version[5:6] != b"1":
        raise HttpProtocolError("only HTTP/1.0 and HTTP/1.1 are served", 505, "HTTPVersionNotSupported")
    headers = read_fields(stream)
    hosts = sum(name == "host" for name, _ in headers)
    if hosts > 1 or (hosts == 0 and version != b"HTTP/1.0"):
        raise HttpProtocolError("a request needs one Host header (HTTP/1.0: at most one)")
    body_framing(headers)
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers


def has_leftover(stream):
    """True when bytes or an end of stream wait on stream (an HttpStream) past what was
    taken: in its buffer, in TLS's, or in the socket; a broken socket too (whoever reads it
    next sees the end). No wait: a zero-timeout select. (Not a peek: a recv on a socket
    with a timeout may wait for that timeout when another thread takes the bytes first.)"""
    sock = stream.sock
    if stream.buffer or getattr(sock, "pending", lambda: 0)():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _remaining(deadline):
    """Seconds left until deadline (None: no limit); socket.timeout when none are."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout("the deadline has passed")
    return remaining


_TLS_CONTEXTS = []


def _tls_context():
    """One verifying TLS context, made at the first https connection: ssl is imported
    then, not at start (an endpoint on loopback, and Lambda's own API, never need it),
    and the system's certificates are loaded once."""
    if not _TLS_CONTEXTS:
        import ssl

        _TLS_CONTEXTS.append(ssl.create_default_context())  # a race makes two: harmless
    return _TLS_CONTEXTS[0]


class HttpConnection(HttpStream):
    """One outbound HTTP/1.1 connection, plain or TLS (port None: the scheme's), whose every
    read and write ends by self.deadline (monotonic seconds), which each exchange sets;
    None waits as long as it takes (only Lambda's /event/next does). self.headers: the
    fields of the last answer.

    Not http.client: its timeout applies to each socket operation, so a peer sending 10
    bytes a second never trips it (docs/pitfalls.md), and it brings the email package,
    about 10 ms and 1.5 MiB of every cold start (docs/design.md, "Cold start"). What is
    needed here, one request and one answer of known framing at a time, is short."""

    def __init__(self, scheme, host, port, deadline):
        sock = socket.create_connection((host, port or (443 if scheme == "https" else 80)), _remaining(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests: no Nagle delay
            if scheme == "https":
                sock.settimeout(_remaining(deadline))
                sock = _tls_context().wrap_socket(sock, server_hostname=host)  # certificates, host name
        except BaseException:
            sock.close()
            raise
        super().__init__(sock)
        self.deadline = deadline
        self.headers = []

    def receive(self, size):
        self.sock.settimeout(_remaining(self.deadline))
        return self.sock.recv(size)

    def close(self):
        self.sock.close()


def open_connection(parts, deadline):
    """A connected HttpConnection to urlsplit parts, within the deadline."""
    return HttpConnection(parts.scheme, parts.hostname, parts.port, deadline)


def exchange(connection, method, target, headers, body, deadline, cap=MAX_ANSWER_BYTES):
    """Send one request on connection and read its whole answer by the deadline: (status,
    data, reusable); the answer's fields are left on connection.headers.

    The request is checked before a byte is sent: ValueError, naming the header (never its
    value), for a target that is not VCHAR, a header name that is not a token, or a value
    the field rule refuses (a CR or LF would inject a header of its own). reusable is
    true only after one complete answer that does not ask to close: one framed by the end
    of the connection leaves it unusable (docs/pitfalls.md). Raises socket.timeout,
    OSError (ConnectionError for an answer cut short), or HttpProtocolError for an answer
    the grammar refuses or over cap bytes: a declared length or a chunk over it is refused
    before it is read, an answer framed by the end of the connection once cap + 1 bytes of
    it are in (nothing more is received; the head's reads may have brought up to
    MAX_START_LINE bytes)."""
    if body is not None:
        headers = [*headers, ("Content-Length", str(len(body)))]
    if not target.isascii() or target.encode("ascii").translate(None, VCHAR):
        raise ValueError("the request target holds a character that is not VCHAR")
    head = f"{method} {target} HTTP/1.1\r\n".encode("ascii")
    for name, value in headers:
        try:
            name_bytes, value_bytes = name.encode("ascii"), value.encode("latin-1")
        except UnicodeEncodeError:
            name_bytes = value_bytes = b"\0"
        if not (is_token(name_bytes) and is_field_value(value_bytes)):
            raise ValueError(f"the header {name!r} holds a character that a header cannot carry")
        head += name_bytes + b": " + value_bytes + b"\r\n"
    connection.deadline = deadline
    connection.sock.settimeout(_remaining(deadline))
    connection.sock.sendall(head + b"\r\n" + (body or b""))
    status = 100
    while status < 200:  # an interim answer (1xx) is read past: the final one follows (RFC 9110 section 15.2)
        version, _, rest = connection.read_line(MAX_START_LINE, ("a status line is too long",)).partition(b" ")
        code, space, reason = rest.partition(b" ")
        # HTTP/1.x SP 3DIGIT SP reason-phrase, maybe empty (RFC 9112 section 4); 100 to 599
        # (RFC 9110 section 15), but 101: no request here asks to switch protocols.
        if not (is_version(version) and version[5:6] == b"1" and space and len(code) == 3 and code.isdigit()
                and 100 <= int(code) <= 599 and code != b"101" and is_field_value(reason)):
            raise HttpProtocolError("the answer does not begin with an HTTP/1.x status line")
        status, fields = int(code), read_fields(connection)
        framing, length = body_framing(fields)
    connection.headers = fields
    # HTTP/1.1 and later persist unless Connection says close (RFC 9112 section 9.3).
    keep = version != b"HTTP/1.0" and "close" not in field_tokens(fields, "connection")
    if status in (204, 304) or method == "HEAD":
        return status, b"", keep  # no body (RFC 9112 section 6.3)
    if framing == "chunked":
        return status, read_chunked(connection, cap), keep
    if framing == "length" and length > cap:
        raise HttpProtocolError(f"an answer of {length} bytes (at most {cap} are read)")
    # Neither field: the body ends with the connection (RFC 9112 section 6.3), which then
    # cannot be reused.
    data = connection.read(length, to_end=False) if framing else connection.read(cap + 1, to_end=True)
    if len(data) > cap:
        raise HttpProtocolError(f"an answer over {cap} bytes")
    return status, data, keep and framing is not None


def fetch(scheme, host, port, method, target, headers, body, deadline, cap=MAX_ANSWER_BYTES, connect_deadline=None):
    """One exchange on a connection of its own (connected by connect_deadline, else by
    deadline), closed after it: (status, data, the answer's fields)."""
    connection = HttpConnection(scheme, host, port, connect_deadline or deadline)
    try:
        return exchange(connection, method, target, headers, body, deadline, cap)[:2] + (connection.headers,)
    finally:
        connection.close()

# ---------------------------------------------------------------------------
# Early start: listening and registered before anything else is imported
# ---------------------------------------------------------------------------
#
# Lambda starts the function's runtime only once every extension has registered, so all
# that runs before /register is paid on every cold start (docs/design.md, "Cold start").
# This section needs nothing but the one above and errno, os, select, signal, socket, sys
# and time: it binds the listening sockets (a request the function sends before serving
# begins waits in the listen backlog, never refused) and registers with the HTTP client
# above. The rest of the file is then imported while Lambda starts the runtime. A failure
# here is only noted: it is reported once the rest is loaded (after /register, with
# /init/error and its type).

DEFAULT_NAME = "parameters-secrets-extension"
DEFAULT_PORT = 2773
LISTEN_BACKLOG = 128
REGISTER_BODY = b'{"events": ["INVOKE", "SHUTDOWN"]}'
MAX_REGISTER_ANSWER = 64 * 1024  # Lambda's answer is a few hundred bytes
REGISTER_TIMEOUT_SECONDS = 10.0


def listening_port(environ):
    """PARAMETERS_SECRETS_EXTENSION_HTTP_PORT when it is a whole number from 1 to 65535,
    else 2773: load_config's rule for this one setting (it WARNs later; a test checks that
    both agree), without its imports."""
    text = (environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT") or "").strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    return int(text) if digits.isdecimal() and 1 <= int(text) <= 65535 else DEFAULT_PORT


def limit_hops(sock):
    """IP TTL (hop limit) 1: no answer can cross a network hop, whatever a route says (as
    the Secrets Manager Agent does)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)


def bind_loopback(port):
    """([listening sockets], problem): 127.0.0.1, and ::1 where the host has it, at port.
    problem is None, or (Lambda error type, message) naming the address that could not be
    bound; then no socket is kept. ::1 held by another process is a problem, not a
    detail: callers whose `localhost` is ::1 would hand that process their token."""
    sockets = []
    for family, address, shown_host in ((socket.AF_INET, ("127.0.0.1", port), "127.0.0.1"),
                                        (socket.AF_INET6, ("::1", port, 0, 0), "::1")):
        if family == socket.AF_INET6 and not socket.has_ipv6:
            break
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            break  # no IPv6 on this host: fine
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            limit_hops(sock)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE or family == socket.AF_INET:
                for kept in sockets:
                    kept.close()
                if error.errno == errno.EADDRINUSE:
                    return [], ("Extension.PortInUse", f"port {port} on {shown_host} is already in use")
                return [], ("Extension.ListenFailed", f"port {port} on {shown_host} cannot be bound ({error.strerror})")
            break  # ::1 not configured on this host: fine
        sockets.append(sock)
    return sockets, None


def runtime_api_address(runtime_api):
    """(host, port) of AWS_LAMBDA_RUNTIME_API, host:port as Lambda sets it (127.0.0.1:9001;
    a bracketed IPv6 host too). Raises ValueError naming the variable."""
    host, _, port = runtime_api.rpartition(":")
    name = host[1:-1] if host[:1] == "[" and host[-1:] == "]" else host
    allowed = ":." if host[:1] == "[" else ".-"
    if not (name and name.isascii() and all(c.isalnum() or c in allowed for c in name)
            and port.isascii() and port.isdecimal() and 0 < int(port) < 65536):
        raise ValueError(f"AWS_LAMBDA_RUNTIME_API={runtime_api!r} is not host:port")
    return name, int(port)


def register(runtime_api, name, timeout=REGISTER_TIMEOUT_SECONDS):
    """POST /2020-01-01/extension/register with the client above: (status, identifier or
    None, body), the whole exchange within timeout seconds, the answer read by its framing
    (a Runtime API that keeps the connection open must not hold the cold start). Raises
    OSError when Lambda cannot be reached or does not answer in time, HttpProtocolError for
    an answer the grammar refuses, ValueError for a malformed address or name."""
    host, port = runtime_api_address(runtime_api)
    status, body, fields = fetch("http", host, port, "POST", "/2020-01-01/extension/register",
                                 [("Host", runtime_api), ("Lambda-Extension-Name", name),
                                  ("Content-Type", "application/json")], REGISTER_BODY,
                                 time.monotonic() + timeout, MAX_REGISTER_ANSWER)
    return status, dict(fields).get("lambda-extension-identifier") or None, body


class EarlyStart:
    """What the early start did: the sockets it listens on (or the bind problem), and
    Lambda's answer to /register (or why there is none)."""

    def __init__(self, argv, environ):
        # SIGTERM and SIGINT wait until main() can handle them (docs/design.md, "Signals"):
        # a stop that comes while the rest is imported must still be an orderly one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        self.name = argv[1] if len(argv) > 1 else DEFAULT_NAME
        self.port = listening_port(environ)
        self.sockets, self.bind_problem = bind_loopback(self.port)
        self.registration = self.register_error = None
        runtime_api = environ.get("AWS_LAMBDA_RUNTIME_API")
        if runtime_api:
            try:
                self.registration = register(runtime_api, self.name)
            except (OSError, ValueError, HttpProtocolError) as error:
                self.register_error = error


# Only when run (python -m extension, as the layer does, or python3 extension.py), and not
# for an option such as --help: importing this file for its tests binds nothing.
RUN = __name__ == "__main__" and not (sys.argv[1:] and sys.argv[1].startswith("-"))
EARLY = EarlyStart(sys.argv, os.environ) if RUN else None

# The rest of the standard library the extension needs, imported once registered.
import _thread
import hashlib
import hmac
import http  # HTTPStatus only: the package itself is small (http.server is not imported)
import json
import re
import threading
from collections import OrderedDict, namedtuple
from datetime import datetime, timezone
from functools import partialmethod  # functools is loaded already (by re)
from urllib.parse import quote, unquote_to_bytes, urlsplit

# ---------------------------------------------------------------------------
# Errors: every failure that has an answer, and where it becomes one
# ---------------------------------------------------------------------------

class HttpError(Exception):
    """A failure with its own HTTP answer: status, error type, and a message for the caller
    that never holds a value or a token. str(error) may say more, for the log."""

    def __init__(self, status, error_type, message, detail=None):
        super().__init__(detail or message)
        self.status, self.error_type, self.message = status, error_type, message


class ClientError(HttpError):
    """A request we refuse (4xx): the caller can fix it."""


class UpstreamError(HttpError):
    """A failed AWS call. transient: a stale value may answer instead; retryable: another
    attempt may succeed (the SDKs' standard retry mode); throttling: AWS refused the call
    for the account's rate, which has a retry policy of its own (docs/design.md, "Throttling")."""

    transient = retryable = throttling = False


# The AWS SDKs' throttling error codes (standard retry mode).
THROTTLING_ERRORS = frozenset((
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
))


class AwsError(UpstreamError):
    """AWS answered with an error: passed to the caller with AWS's status and type."""

    def __init__(self, status, error_type, message):
        super().__init__(status, error_type, message, f"{error_type} ({status})")
        self.throttling = status == 429 or error_type in THROTTLING_ERRORS
        self.transient = self.retryable = status >= 500 or self.throttling


class ItemError(AwsError):
    """AWS's answer about one item of a batch call (a name in GetParameters'
    InvalidParameters, an entry in BatchGetSecretValue's Errors), while the call itself
    succeeded. A batch route lists it in its answer; a single read of that item answers
    it as an error. Transient only when AWS's code says so (throttling, InternalServiceError)."""

    def __init__(self, error_type, message):
        super().__init__(500 if error_type == "InternalServiceError" else 400, error_type, message)


class UpstreamUnreachable(UpstreamError):
    """No answer could be had: connection refused, reset, closed mid-body, bad TLS."""

    transient = retryable = True

    def __init__(self, detail):
        super().__init__(502, "UpstreamUnreachable", "AWS could not be reached", detail)


class UpstreamTimeout(UpstreamError):
    """No answer within the request's budget (or, without one, the fixed attempt limit)."""

    transient = retryable = True

    def __init__(self, detail):
        super().__init__(504, "UpstreamTimeout", "AWS did not answer in time", detail)


class UpstreamInvalidResponse(UpstreamError):
    """An answer that is not what the API defines: a wrong shape, another name than the one
    asked, an interim or unexpected status, or more than MAX_ANSWER_BYTES. Never cached."""

    transient = retryable = True

    def __init__(self, detail):
        super().__init__(502, "UpstreamInvalidResponse", "AWS sent an answer this extension cannot use", detail)


class TooManyParameters(UpstreamError):
    """A path that holds more parameters than get-by-path answers (MAX_PATH_PARAMETERS).
    Not transient: another try finds as many."""

    def __init__(self, limit):
        super().__init__(502, "TooManyParameters",
                         f"the path holds more than {limit} parameters, the most get-by-path answers; "
                         "read narrower paths (recursive=false, or a longer path)")


class CredentialsUnavailable(UpstreamError):
    """The credentials could not be had (the container endpoint failed). Not retried: the
    provider already gave it its time; a stale value may answer."""

    transient = True

    def __init__(self, detail):
        super().__init__(502, "CredentialsUnavailable", "no AWS credentials could be had; see the extension's log",
                         detail)


class ConnectionsBusy(UpstreamError):
    """Every outbound connection stayed busy for the whole budget. Not an upstream timeout,
    so not retried (docs/http-api.md); a stale value may answer."""

    transient = True

    def __init__(self, detail):
        super().__init__(503, "ConnectionsBusy", "every connection to AWS is busy; retry", detail)


class UnresolvedReference(Exception):
    """The wrapper's mode (Values in environment variables): a {{ssm:...}} or
    {{secret:...}} reference that cannot become a value: error_type names why (AWS's __type, or one
    of ours); message never holds a value or a token."""

    def __init__(self, error_type, message=""):
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type, self.message = error_type, message
        self.variable = self.reference = None  # set where they are known


class CredentialsError(Exception):
    """No usable credentials source (found at start, or a fetch that failed). The message
    names what was looked for, never a key."""


class ExtensionsApiError(Exception):
    """The Extensions API refused a call (403 with errorType) or could not be reached."""


class Fatal(Exception):
    """A start-up failure, with the Lambda error type that names its cause."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type


class Stop(Exception):
    """Raised in the main thread by SIGTERM / SIGINT."""


def error_answer(error):
    """The one place where a failure becomes an HTTP answer: (status, headers, body).
    Bodies never hold a value or a token; anything unforeseen is a 500 with no detail."""
    if isinstance(error, HttpError):
        status, error_type, message = error.status, error.error_type, error.message
    else:
        status, error_type, message = 500, "InternalError", "the extension failed; see its log"
    headers = (("Allow", "GET"),) if status == 405 else ()
    return status, headers, json.dumps({"__type": error_type, "message": message}).encode("utf-8")

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# The official extension caps TTLs at 300 s. Users ask for longer (an hour of a value
# that changes once a quarter saves 11 of every 12 calls), and the open Secrets Manager
# Agent allows 3600 s, so we clamp there: long enough to matter, short enough that a
# rotated secret still shows within the hour.
TTL_CEILING = 3600

# The extension's own settings, the one table from which Config's fields, their
# defaults and their checks come (the docstring's table is checked against it by
# tests/test_config.py). accepted is either (minimum, maximum or None) for a whole
# number, clamped into range with a WARN (the port excepted: see CLAMPED), or the words
# accepted, compared in lower case. A value that fails falls back to the default.
SETTINGS = (
    # variable                                          Config field         default  accepted
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS",              "ssm_timeout_ms",     0,      (0, None)),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS",                  "secrets_timeout_ms", 0,      (0, None)),
    ("SSM_PARAMETER_STORE_TTL",                         "ssm_ttl",            300,    (0, TTL_CEILING)),
    ("SECRETS_MANAGER_TTL",                             "secrets_ttl",        300,    (0, TTL_CEILING)),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED",      "cache_enabled",      "true", ("true", "false")),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE",         "cache_size",         1000,   (0, 1000)),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT",          "port",               2773,   (1, 65535)),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS",    "max_connections",    3,      (1, None)),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL",          "log_level",          "info",
     ("debug", "info", "warn", "error", "none")),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS",  "max_stale_seconds",  300,    (0, 86400)),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS",        "max_clients",        64,     (1, 1024)),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "read_timeout_ms",   10000,  (100, 600000)),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS",            "metrics",            "none", ("none", "emf")),
    ("PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD",      "refresh_ahead",      0,      (0, 99)),
)
# Out of range, a port is not clamped but falls back to the default: port 1 or 65535 is
# never what someone who wrote 0 or 70000 meant.
NOT_CLAMPED = frozenset(("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT",))


def _typed(value, accepted):
    """A setting's value as Config holds it: true / false settings as booleans."""
    return value == "true" if accepted == ("true", "false") else value


# Every variable we read. A variable that is not one of these but looks like one
# (PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE, SECRET_MANAGER_TTL) earns a WARN naming
# the intended spelling: the official extension ignores typos silently.
SDK_VARIABLES = (
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_USE_FIPS_ENDPOINT",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_INITIALIZATION_TYPE",
)
OUR_VARIABLES = tuple(row[0] for row in SETTINGS) + (
    "PARAMETERS_SECRETS_EXTENSION_PREFETCH",
    "PARAMETERS_SECRETS_EXTENSION_PYTHON",  # read by bootstrap, not here
)
KNOWN_VARIABLES = frozenset(OUR_VARIABLES + SDK_VARIABLES)
# Only names containing one of these words are compared with ours, so that unrelated
# variables (PATH, MY_APP_TTL) never cost a comparison or a false warning.
NEAR_MISS_WORDS = ("PARAMETER", "SECRET", "SSM", "EXTENSION", "ENDPOINT_URL")


# Config's fields: the settings above, then what load_config derives from the rest of
# the environment (None where absent).
# The fields read as they are, from one variable each (empty counts as absent):
AS_IS = (
    ("lambda_runtime_api", "AWS_LAMBDA_RUNTIME_API"), ("initialization_type", "AWS_LAMBDA_INITIALIZATION_TYPE"),
    ("home", "HOME"), ("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("session_token", "AWS_SESSION_TOKEN"), ("container_full_uri", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    ("container_relative_uri", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
    ("container_token", "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
    ("container_token_file", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
    ("shared_credentials_file", "AWS_SHARED_CREDENTIALS_FILE"), ("config_file", "AWS_CONFIG_FILE"),
)
CONFIG_FIELDS = tuple((field, _typed(default, accepted)) for _, field, default, accepted in SETTINGS) + (
    ("prefetch", ()), ("log_format", "text"), ("region", None), ("ssm_endpoint", None), ("secrets_endpoint", None),
    ("endpoint_error", None), ("request_token", None), ("profile", "default"),
) + tuple((field, None) for field, _ in AS_IS)
# Kept out of repr(), so that no log line can ever print them.
SECRET_FIELDS = frozenset(("request_token", "secret_access_key", "session_token", "container_token"))


class Config(namedtuple("Config", [name for name, _ in CONFIG_FIELDS],
                        defaults=[default for _, default in CONFIG_FIELDS])):
    """Everything the extension reads from its environment, read once by load_config.

    Frozen: a named tuple, whose fields cannot be assigned. Not a dataclass: importing
    dataclasses pulls in inspect and ast, ~15 ms of every cold start (bench/)."""

    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self)
                           if name not in SECRET_FIELDS)
        return f"Config({fields})"


def _present(environ, name):
    """An empty variable counts as absent: the Lambda RIE sets AWS_SESSION_TOKEN= when unset."""
    value = environ.get(name)
    return value if value else None


def near_miss_warnings(environ):
    """WARN texts for variables that look like ours but are not spelled as ours."""
    candidates = [name for name in environ if name not in KNOWN_VARIABLES
                  and any(word in name.upper() for word in NEAR_MISS_WORDS)]
    if not candidates:
        return []
    import difflib  # only when there is something to compare: keeps start-up lean

    # Compared without the separators and the word AND: the commonest typos are
    # PARAMETERS_AND_SECRETS_..., a missing S and a missing underscore.
    table = {re.sub(r"_|AND", "", known): known for known in KNOWN_VARIABLES}
    warnings = []
    for name in sorted(candidates):
        upper = name.upper()
        if upper in KNOWN_VARIABLES:
            intended = upper  # variable names are case-sensitive
        else:
            squashed = re.sub(r"_|AND", "", upper)
            close = difflib.get_close_matches(squashed, table, n=1, cutoff=0.85)
            if not close:
                continue
            intended = table[close[0]]
        warnings.append(f"ignoring {name}: did you mean {intended}?")
    return warnings


def _without_userinfo(url):
    """url with any user:password@ part replaced by ***@, for messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#@]*@", lambda m: (m.group(1) or "") + "***@", url)


# Where each partition keeps its endpoints (checked against botocore's endpoint rules).
PARTITION_SUFFIXES = (
    ("cn-", "amazonaws.com.cn"),
    ("us-isob-", "sc2s.sgov.gov"),
    ("us-isof-", "csp.hci.ic.gov"),
    ("us-iso-", "c2s.ic.gov"),
    ("eu-isoe-", "cloud.adc-e.uk"),
)
ENDPOINT_OVERRIDES = {"ssm": "AWS_ENDPOINT_URL_SSM", "secretsmanager": "AWS_ENDPOINT_URL_SECRETS_MANAGER"}


def endpoint_url(service, region, environ):
    """The base URL for service ("ssm" or "secretsmanager") in region, as the SDKs choose it:
    a service override, then AWS_ENDPOINT_URL, then the partition's (FIPS) endpoint."""
    for variable in (ENDPOINT_OVERRIDES[service], "AWS_ENDPOINT_URL"):
        override = _present(environ, variable)
        if override:
            parts = urlsplit(override)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{variable}={_without_userinfo(override)!r} is not an http(s) URL with a host")
            if "@" in parts.netloc:
                # It would go out in the Host header, and the message must not print it.
                raise ValueError(f"{variable}={_without_userinfo(override)!r} holds a user or password: "
                                 "AWS endpoints take none")
            return override.rstrip("/")
    if not re.fullmatch(r"[a-z0-9-]+", region):
        raise ValueError(f"region {region!r} is not a region name")
    suffix = next((s for prefix, s in PARTITION_SUFFIXES if region.startswith(prefix)), "amazonaws.com")
    fips = (_present(environ, "AWS_USE_FIPS_ENDPOINT") or "").lower() == "true"
    host = service
    # GovCloud's Parameter Store endpoint is FIPS-validated already and has no -fips name.
    if fips and not (service == "ssm" and region.startswith("us-gov-")):
        host += "-fips"
    return f"https://{host}.{region}.{suffix}"


def _whole_number(variable, raw, default, minimum, maximum):
    """(value, WARN message or None) for a whole-number setting, clamped into range."""
    if not re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return default, f"{variable}={raw!r} is not a whole number, using default {default}"
    value = int(raw)
    if variable in NOT_CLAMPED and not minimum <= value <= maximum:
        return default, f"{variable}={value} is outside {minimum}-{maximum}, using default {default}"
    if value < minimum:
        return minimum, f"{variable}={value} is below the minimum {minimum}, using {minimum}"
    if maximum is not None and value > maximum:
        return maximum, f"{variable}={value} is above the maximum {maximum}, using {maximum}"
    return value, None


def load_config(environ):
    """Read the environment once. Returns (Config, [(level, message), ...]) without logging,
    so that it stays a pure function and the caller logs once its logger exists."""
    messages = []
    values = {}
    for variable, name, default, accepted in SETTINGS:
        raw = environ.get(variable)
        if raw is None:
            messages.append(("debug", f"{variable} not present, using default {default}"))
            value = default
        elif isinstance(default, int):
            value, message = _whole_number(variable, raw, default, *accepted)
            if message:
                messages.append(("warn", message))
        elif raw.strip().lower() in accepted:
            value = raw.strip().lower()
        else:
            messages.append(("warn", f"{variable}={raw!r} is not one of {', '.join(accepted)} (any case), "
                                     f"using default {default}"))
            value = default
        values[name] = _typed(value, accepted)

    prefetch = environ.get("PARAMETERS_SECRETS_EXTENSION_PREFETCH", "")
    values["prefetch"] = tuple(entry for entry in re.split(r"[\s,]+", prefetch) if entry)
    values["log_format"] = "json" if (environ.get("AWS_LAMBDA_LOG_FORMAT") or "").upper() == "JSON" else "text"

    region = _present(environ, "AWS_REGION") or _present(environ, "AWS_DEFAULT_REGION")
    values["region"] = region
    if region:
        try:
            values["ssm_endpoint"] = endpoint_url("ssm", region, environ)
            values["secrets_endpoint"] = endpoint_url("secretsmanager", region, environ)
        except ValueError as error:
            values["endpoint_error"] = str(error)

    values["request_token"] = (_present(environ, "AWS_TOKEN") or _present(environ, "AWS_SESSION_TOKEN")
                               or _present(environ, "AWS_CONTAINER_AUTHORIZATION_TOKEN"))
    values["profile"] = _present(environ, "AWS_PROFILE") or "default"
    values.update((field, _present(environ, variable)) for field, variable in AS_IS)

    messages.extend(("warn", text) for text in near_miss_warnings(environ))
    return Config(**values), messages


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40, "none": 100}


def iso8601(epoch_seconds):
    """2022-11-16T08:22:40.362Z: the SDK's timestamp text, UTC with milliseconds."""
    total_ms = int(round(epoch_seconds * 1000))
    seconds, ms = divmod(total_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


class Logger:
    """Lines on stderr: "[name] LEVEL message", or one JSON object per line when the
    function uses Lambda's JSON log format. Callers never pass a secret value or a token:
    parameter names, secret ids and error types are the most a line ever holds."""

    def __init__(self, name, level="info", log_format="text", stream=None):
        self.name = name
        self.threshold = LEVELS[level]
        self.json = log_format == "json"
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def enabled(self, level):
        return LEVELS[level] >= self.threshold

    def log(self, level, message):
        if LEVELS[level] < self.threshold:
            return
        if self.json:
            now = time.time()
            line = json.dumps({"timestamp": iso8601(now), "level": level.upper(), "message": message,
                               "extension": self.name})
        else:
            line = f"[{self.name}] {level.upper()} {message}"
        with self._lock:  # one writer at a time, so lines from threads never interleave
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must never take the server down

    debug, info = partialmethod(log, "debug"), partialmethod(log, "info")
    warn, error = partialmethod(log, "warn"), partialmethod(log, "error")


# C0 and C1 control characters and DEL: a raw ESC or CSI from a request would reach the
# terminal or log viewer of whoever reads the log (docs/pitfalls.md).
LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text, limit=200):
    """text for a log line: control characters escaped as \\xNN, cut at limit characters.
    Only for names, ids, paths and keys: values and tokens never reach a log line at all."""
    text = str(text)
    cut = len(text) > limit
    text = LOG_UNSAFE.sub(lambda match: f"\\x{ord(match.group()):02x}", text[:limit])
    return text + "\u2026" if cut else text


# ---------------------------------------------------------------------------
# SigV4 (pure functions, one per step of AWS's "Create a signed AWS API request")
# ---------------------------------------------------------------------------

ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials:
    """An access key pair, with the session token and expiry of temporary credentials."""

    __slots__ = ("access_key_id", "secret_access_key", "session_token", "expiration")

    def __init__(self, access_key_id, secret_access_key, session_token=None, expiration=None):
        # Checked where they come in (the environment or a file at start, the container
        # endpoint's JSON), not at the first call: a CR or LF would inject a header.
        for field in (access_key_id, secret_access_key, session_token or "none"):
            if not (isinstance(field, str) and field and field.isascii() and field.isprintable()):
                raise CredentialsError("a key is empty, or a key or the token is not printable ASCII text")
        self.access_key_id, self.secret_access_key, self.session_token = access_key_id, secret_access_key, session_token
        self.expiration = expiration  # epoch seconds, or None for credentials that do not expire

    def __repr__(self):  # never the secret key or the token
        return f"Credentials(access_key_id={self.access_key_id!r}, expiration={self.expiration!r})"


def _uri_encode(text, safe):
    # AWS's UriEncode: every byte but the unreserved A-Z a-z 0-9 - _ . ~ is %XX, upper case.
    return quote(text, safe=safe)


def canonical_query_string(query):
    """Step 1c: each key=value decoded, re-encoded the AWS way, sorted by key then value."""
    pairs = []
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        pairs.append((_uri_encode(unquote_to_bytes(key), "-_.~"), _uri_encode(unquote_to_bytes(value), "-_.~")))
    return "&".join(f"{key}={value}" for key, value in sorted(pairs))


def _canonical_header_map(headers):
    # Names lower-cased; values trimmed with inner runs of white space (obs-fold too)
    # collapsed to one space; a repeated header's values joined by commas in order.
    merged = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    return {name: ",".join(values) for name, values in merged.items()}


def signed_header_names(headers):
    """Step 1e: the lower-cased names of the signed headers, sorted, joined by ';'."""
    return ";".join(sorted(_canonical_header_map(headers)))


def canonical_request(method, path, query, headers, payload_hash):
    """Step 1: the canonical request. Every header given is signed; path is unencoded."""
    header_map = _canonical_header_map(headers)
    canonical_headers = "".join(f"{name}:{header_map[name]}\n" for name in sorted(header_map))
    return "\n".join((
        method,
        _uri_encode(path or "/", "/-_.~"),
        canonical_query_string(query),
        canonical_headers,
        ";".join(sorted(header_map)),
        payload_hash,
    ))


def credential_scope(date_stamp, region, service):
    """Step 2 (part): date/region/service/aws4_request."""
    return f"{date_stamp}/{region}/{service}/aws4_request"


def string_to_sign(amz_date, scope, canonical_request_text):
    """Step 2: the algorithm, the time, the scope and the hash of the canonical request."""
    digest = hashlib.sha256(canonical_request_text.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signing_key(secret_key, date_stamp, region, service):
    """Step 3: the key derived from the secret access key, one HMAC per scope element."""
    key = hmac.new(("AWS4" + secret_key).encode("utf-8"), date_stamp.encode("utf-8"), hashlib.sha256).digest()
    for element in (region, service, "aws4_request"):
        key = hmac.new(key, element.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key, string_to_sign_text):
    """Step 4: the hex HMAC of the string to sign."""
    return hmac.new(key, string_to_sign_text.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(method, url, headers, body, credentials, region, service, now):
    """All the headers to send for a signed request: the given ones plus Host (as sent,
    port included), X-Amz-Date, X-Amz-Security-Token when the credentials carry one, and
    Authorization. The session token is signed only with the credentials it came with."""
    parts = urlsplit(url)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date_stamp = amz_date[:8]
    to_sign = list(headers) + [("Host", parts.netloc), ("X-Amz-Date", amz_date)]
    if credentials.session_token:
        to_sign.append(("X-Amz-Security-Token", credentials.session_token))
    path = unquote_to_bytes(parts.path or "/").decode("utf-8")
    request = canonical_request(method, path, parts.query, to_sign, hashlib.sha256(body).hexdigest())
    scope = credential_scope(date_stamp, region, service)
    key = signing_key(credentials.secret_access_key, date_stamp, region, service)
    authorization = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                     f"SignedHeaders={signed_header_names(to_sign)}, "
                     f"Signature={signature(key, string_to_sign(amz_date, scope, request))}")
    return to_sign + [("Authorization", authorization)]


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------

# Refresh temporary credentials this long before they expire, so that a request signed
# just before expiry is not refused on arrival.
REFRESH_WINDOW_SECONDS = 300
# One fetch from the container credentials endpoint (connect, headers, body) ends within
# this, and never later than the deadline of the request that waits for it. The endpoint
# is local to the host: it answers in milliseconds or not at all.
CREDENTIALS_FETCH_SECONDS = 2.0
MAX_CREDENTIALS_BYTES = 64 * 1024
CONTAINER_HOST = "169.254.170.2"
# Hosts that may receive the container authorization token over plain http, as the
# SDKs allow: loopback, and the ECS / EKS credential addresses. Any host over https.
CONTAINER_HTTP_HOSTS = ("127.0.0.1", "localhost", "::1", "169.254.170.2", "169.254.170.23", "fd00:ec2::23")
# Keys of a profile that need an SDK or the CLI (SSO, role assumption, a helper program).
PROFILE_NEEDS_SDK = ("role_arn", "sso_session", "sso_start_url", "sso_account_id", "credential_process",
                     "web_identity_token_file", "source_profile", "credential_source")


def parse_iso8601(text):
    """Epoch seconds of an ISO-8601 time such as 2026-11-26T16:00:00Z (a fraction and a
    +hh:mm offset are honoured; no offset means UTC)."""
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?", text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 time: {text!r}")
    # datetime, not calendar.timegm: calendar imports locale, ~2 ms of every cold start.
    seconds = datetime(*(int(part) for part in match.groups()[:6]), tzinfo=timezone.utc).timestamp()
    offset = match.group(8)
    if offset and offset != "Z":
        sign = -1 if offset[0] == "+" else 1
        digits = offset[1:].replace(":", "")
        seconds += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds + float(match.group(7) or 0)


class CredentialProvider:
    """Credentials in the SDKs' order: environment keys, then container credentials
    (Lambda SnapStart, ECS), then static keys of the shared credentials file.

    Container credentials are fetched when first needed and refreshed before they
    expire. Expiry is judged on the wall clock (wall), which a snapshot restore sets
    right; deadlines on the monotonic clock (clock), like every deadline here. Lock rule:
    self._lock serialises refreshes and is held during the local HTTP call; it is waited
    for only until the caller's own deadline."""

    def __init__(self, config, log, wall=time.time, clock=time.monotonic):
        self.config, self.log, self.wall, self.clock = config, log, wall, clock
        self.source = None
        self._current = None
        self._lock = threading.Lock()

    def resolve(self):
        """Choose the source at start (no network). Raises CredentialsError."""
        c = self.config
        if c.access_key_id and c.secret_access_key:
            self.source = "environment"
            self._current = Credentials(c.access_key_id, c.secret_access_key, c.session_token)
        elif c.container_full_uri or c.container_relative_uri:
            self.source = "container"
            self.container_url()  # validates the URL now rather than at the first request
        else:
            self._current = self._from_shared_files()
            if self._current is None:
                raise CredentialsError(
                    "no AWS credentials: looked for AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI / _RELATIVE_URI, and profile "
                    f"{c.profile!r} in {self._credentials_path()}")
            self.source = "shared credentials file"
        self.log.debug(f"credentials from the {self.source}")
        return self.source

    def _fresh(self, credentials):
        return credentials is not None and (credentials.expiration is None
                                            or credentials.expiration - self.wall() > REFRESH_WINDOW_SECONDS)

    def get(self, deadline=None):
        """Current credentials; container credentials fetched when near expiry. deadline:
        the caller's (monotonic), or None. Raises UpstreamTimeout when the caller's deadline
        ran out first, CredentialsUnavailable when the endpoint failed."""
        current = self._current
        if self._fresh(current):
            return current
        wait = CREDENTIALS_FETCH_SECONDS if deadline is None else deadline - self.clock()
        if wait <= 0 or not self._lock.acquire(timeout=wait):
            raise UpstreamTimeout("waiting for credentials")
        try:
            current = self._current
            if self._fresh(current):
                return current  # another thread refreshed while we waited
            fetch_deadline = self.clock() + CREDENTIALS_FETCH_SECONDS
            bound_by_caller = deadline is not None and deadline < fetch_deadline
            try:
                self._current = self._from_container(deadline if bound_by_caller else fetch_deadline)
            except CredentialsError as error:
                if current is not None and current.expiration > self.wall():
                    self.log.warn(f"refreshing container credentials failed ({error}); "
                                  "using the current ones until they expire")
                    return current
                if bound_by_caller and self.clock() >= deadline:
                    raise UpstreamTimeout(f"credentials: {error}") from error
                raise CredentialsUnavailable(f"credentials: {error}") from error
            return self._current
        finally:
            self._lock.release()

    def forget(self):
        """Drop fetched credentials (after a snapshot restore): fetched again when needed.
        Keys from the environment or a file are not fetched, so they stay."""
        if self.source == "container":
            self._current = None

    def container_url(self):
        c = self.config
        if c.container_relative_uri:  # the SDKs look at the relative URI first
            # Without a leading "/", "@127.0.0.1:PORT/x" would make another host of it,
            # and the authorization token would go there.
            if not c.container_relative_uri.startswith("/"):
                raise CredentialsError("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must start with '/'")
            return f"http://{CONTAINER_HOST}{c.container_relative_uri}"
        parts = urlsplit(c.container_full_uri)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in CONTAINER_HTTP_HOSTS):
            return c.container_full_uri
        raise CredentialsError(f"AWS_CONTAINER_CREDENTIALS_FULL_URI host {parts.hostname!r} is not allowed: "
                               "use https, loopback or the container credentials address")

    def _from_container(self, deadline):
        c = self.config
        parts = urlsplit(self.container_url())
        headers = [("Host", parts.netloc), ("Accept", "application/json")]
        token = c.container_token
        variable = "AWS_CONTAINER_AUTHORIZATION_TOKEN" + ("_FILE" if c.container_token_file else "")
        if c.container_token_file:
            try:  # read on every refresh: the platform may rotate the file
                with open(c.container_token_file, encoding="utf-8") as token_file:
                    token = token_file.read(MAX_CREDENTIALS_BYTES).strip()  # a token, not a file's worth
            except OSError as error:
                raise CredentialsError(f"cannot read {variable}: {error.strerror}") from error
        if token:
            # A CR or LF would inject a header of its own (exchange refuses it too); never shown.
            if not (token.isascii() and token.isprintable()):
                raise CredentialsError(f"{variable}: the token holds a character that is not printable ASCII")
            headers.append(("Authorization", token))
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        try:
            status, body, _ = fetch(parts.scheme, parts.hostname, parts.port, "GET", target, headers, None, deadline,
                                    MAX_CREDENTIALS_BYTES)
        except socket.timeout:
            raise CredentialsError("container credentials endpoint did not answer in time") from None
        except HttpProtocolError as error:
            raise CredentialsError(f"container credentials endpoint answered: {error}") from None
        except OSError as error:
            raise CredentialsError(f"container credentials endpoint unreachable: {type(error).__name__}") from error
        if status != 200:
            raise CredentialsError(f"container credentials endpoint answered {status}")
        try:
            data = json.loads(body)
            expiration = data.get("Expiration")
            credentials = Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("Token"),
                                      parse_iso8601(expiration) if expiration else None)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise CredentialsError("container credentials endpoint answered malformed JSON") from None
        return credentials

    def _credentials_path(self):
        c = self.config
        return c.shared_credentials_file or os.path.join(c.home or "~", ".aws", "credentials")

    def _from_shared_files(self):
        c = self.config
        import configparser  # only for local runs: Lambda never has a credentials file

        sections = []
        config_path = c.config_file or os.path.join(c.home or "~", ".aws", "config")
        for path, section in ((self._credentials_path(), c.profile),
                              (config_path, c.profile if c.profile == "default" else f"profile {c.profile}")):
            parser = configparser.RawConfigParser()
            try:
                parser.read(path, encoding="utf-8")
            except (configparser.Error, UnicodeDecodeError):
                raise CredentialsError(f"cannot parse {path}") from None
            if parser.has_section(section):
                sections.append(dict(parser.items(section)))
        for values in sections:
            if values.get("aws_access_key_id") and values.get("aws_secret_access_key"):
                return Credentials(values["aws_access_key_id"], values["aws_secret_access_key"],
                                   values.get("aws_session_token") or None)
        if any(key in values for values in sections for key in PROFILE_NEEDS_SDK):
            raise CredentialsError(
                f"profile {c.profile!r} needs SSO or role assumption, which this extension does not do: "
                f'export its credentials first: eval "$(aws configure export-credentials '
                f'--profile {c.profile} --format env)"')
        return None


# ---------------------------------------------------------------------------
# AWS client: AWS JSON 1.1 over keep-alive connections, retries, budgets
# ---------------------------------------------------------------------------

MAX_ATTEMPTS = 3          # the SDKs' standard retry mode: three attempts in all
BACKOFF_BASE = 0.05       # seconds; full jitter: sleep uniform(0, base * 2 ** attempt)
BACKOFF_CAP = 1.0         # a Lambda caller waits: never sleep longer than this
# Throttling is not a fault but a shared quota (Parameter Store: about 40 calls a second
# per account and Region), so a throttled call is retried for as long as its window
# lasts: the caller's budget, or without one THROTTLE_WINDOW seconds from the first
# attempt, which ends inside Lambda's 10 s INIT. Full jitter on the SDKs' standard scale
# (1 s * 2 ** retry, 20 s at most), shrunk by the cube of the share of the window left,
# at least THROTTLE_FLOOR and at most half of what is left: a call that has waited longer
# retries more often, so it wins more of the quota's tokens than younger calls across
# the fleet, and every call gets attempts until its window ends (docs/design.md, "Throttling").
THROTTLE_BASE = 1.0
THROTTLE_CAP = 20.0
THROTTLE_FLOOR = 0.02
THROTTLE_WINDOW = 8.0
# And each process slows itself, as the SDKs' adaptive mode does: for PACE_SECONDS after
# a throttle, its calls to that service take turns from a bucket of PACE_RATE a second
# (PACE_BURST at once), so that its concurrent requests retry at the pace of a few, not
# all at once. A call past half of its window is not held back: its age must keep it ahead.
PACE_SECONDS = 2.0
PACE_RATE = 5.0
PACE_BURST = 5
# With no budget configured (TIMEOUT_MILLIS=0, "no timeout" officially), each attempt
# still ends this long after it began, however the bytes drip: a black-holed or dripping
# connection must not hang a caller forever. The SDKs' defaults (60 s) are longer than
# most Lambda functions live.
ATTEMPT_TIMEOUT_WITHOUT_BUDGET = 10.0
IDLE_CONNECTION_SECONDS = 20.0  # AWS closes idle keep-alive connections; do not reuse older
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
AWS_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.:#-]{1,256}")


def aws_error(status, data):
    """AwsError from an error answer: AWS JSON ({"__type": "...#Code", "message"}), or the
    XML that moto (and AWS's front door) use for signature errors. Whatever the body holds
    (garbage, deep nesting, wrong types), the result is a clean AwsError."""
    error_type, message = "UnknownError", ""
    text = data.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            found_type = parsed.get("__type") or parsed.get("code") or parsed.get("Code")
            found_message = parsed.get("message") or parsed.get("Message")
            error_type = found_type if isinstance(found_type, str) else error_type
            message = found_message if isinstance(found_message, str) else ""
    except (ValueError, RecursionError):
        code = re.search(r"<Code>([^<]*)</Code>", text)
        found = re.search(r"<Message>(?:<!\[CDATA\[(.*?)\]\]>|([^<]*))</Message>", text, re.DOTALL)
        error_type = code.group(1) if code else error_type
        message = (found.group(1) or found.group(2) or "") if found else ""
    error_type = error_type.rsplit("#", 1)[-1].split(":", 1)[0]  # com.amazonaws.ssm#ParameterNotFound
    if not AWS_ERROR_TYPE.fullmatch(error_type):
        error_type = "UnknownError"
    return AwsError(status, error_type, message[:1024])


def throttle_backoff(retry, remaining, window, uniform):
    """Seconds to wait before retry number `retry` of a throttled call that has `remaining`
    of its `window` seconds left, or None when no retry fits (the rule above THROTTLE_BASE).
    uniform(low, high): the random draw."""
    if remaining < 2 * THROTTLE_FLOOR:
        return None
    bound = min(THROTTLE_CAP, THROTTLE_BASE * 2 ** (retry - 1)) * (remaining / window) ** 3
    return uniform(0, min(max(THROTTLE_FLOOR, bound), remaining / 2))


class ServiceClient:
    """Calls one AWS service's JSON 1.1 API (aws_service: "ssm" or "secretsmanager").

    At most max_connections connections are open at once (self._connections); idle ones
    are kept for reuse in self._idle. Lock rule: self._lock guards self._idle and the
    pacing state (_throttled_at, _pace) only, and no lock is held during network I/O or a
    sleep. clock, sleep and draw are injectable (as in sched) so that the budget
    arithmetic is tested without waiting."""

    def __init__(self, aws_service, endpoint, region, credentials, max_connections, stats, log,
                 clock=time.monotonic, sleep=time.sleep, draw=None):
        self.aws_service = aws_service
        self.parts = urlsplit(endpoint)
        self.path = self.parts.path or "/"
        self.url = endpoint if self.parts.path else endpoint + "/"
        self.region, self.credentials, self.stats, self.log, self.clock = region, credentials, stats, log, clock
        self.sleep = sleep
        self.draw = draw           # uniform(low, high) for the jitter; random's, imported at the first retry
        self._connections = threading.BoundedSemaphore(max_connections)
        self._idle = []            # [(connection, last used)]; newest last
        self._throttled_at = -PACE_SECONDS  # when this service last throttled a call (clock)
        self._pace = 0.0           # the pacing bucket's next free turn (clock; GCRA)
        self._lock = threading.Lock()

    def call(self, target, payload, deadline, shape):
        """One API call with retries inside the caller's deadline (monotonic, or None for
        no budget). shape(answer) checks the decoded JSON and returns what to serve; it
        raises UpstreamInvalidResponse, which is retried like any transient fault. Faults
        get MAX_ATTEMPTS quick attempts; throttling is retried until the call's window ends,
        and then (or when the budget is spent) AWS's own error is raised, status and type
        unchanged."""
        body = json.dumps(payload).encode("utf-8")
        credentials = self.credentials.get(deadline)
        first = self.clock()
        window = (deadline if deadline is not None else first + THROTTLE_WINDOW) - first
        faults = throttles = 0
        wait = 0.0
        while True:
            now = self.clock()
            wait = self._turn(now + wait, first + window / 2) - now
            if wait > 0:
                self.sleep(wait)
            try:
                return shape(self._attempt(target, body, credentials, deadline, MAX_ATTEMPTS - faults))
            except UpstreamError as error:
                now = self.clock()
                if error.throttling:
                    throttles += 1
                    with self._lock:
                        self._throttled_at = now
                    wait = throttle_backoff(throttles, first + window - now, window, self._uniform)
                elif error.retryable and faults + 1 < MAX_ATTEMPTS:
                    faults += 1
                    wait = self._uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** faults))
                else:
                    raise
                if wait is None or (deadline is not None and now + wait >= deadline):
                    raise  # no time left for another attempt within the call's window or budget
                self.log.debug(f"{target} attempt {faults + throttles} failed ({error}); "
                               f"retrying in {wait * 1000:.0f} ms")

    def _uniform(self, low, high):
        if self.draw is None:
            import random  # only on the retry path: not at every cold start

            self.draw = random.uniform
        return self.draw(low, high)

    def _turn(self, at, latest):
        """When an attempt wanted at `at` (clock) may start: then, unless this service
        throttled a call within PACE_SECONDS; else at its turn in the pacing bucket, unless
        that turn comes after latest (half of the call's window: not held back)."""
        with self._lock:
            if at - self._throttled_at >= PACE_SECONDS:
                return at
            turn = max(at, self._pace - (PACE_BURST - 1) / PACE_RATE)
            if turn > latest:
                return at
            self._pace = max(self._pace, turn) + 1 / PACE_RATE
            return turn

    def attempt_deadline(self, deadline, attempts_left):
        """When this attempt must end. An attempt that is not the last gets half of what is
        left: a connection that never answers leaves time for a retry, and the first
        attempt, the one that normally succeeds, gets the largest share."""
        now = self.clock()
        if deadline is None:
            return now + ATTEMPT_TIMEOUT_WITHOUT_BUDGET
        remaining = deadline - now
        if remaining <= 0:
            raise UpstreamTimeout(f"{self.aws_service} budget spent")
        return now + (remaining if attempts_left == 1 else remaining / 2)

    def _attempt(self, target, body, credentials, deadline, attempts_left):
        # Waiting for a free connection is bounded by the caller's whole budget; running
        # out is ConnectionsBusy, not a timeout of AWS's (docs/http-api.md).
        wait = ATTEMPT_TIMEOUT_WITHOUT_BUDGET if deadline is None else deadline - self.clock()
        if wait <= 0:
            raise UpstreamTimeout(f"{self.aws_service} budget spent")
        if not self._connections.acquire(timeout=wait):
            raise ConnectionsBusy(f"no free connection to {self.aws_service} in time")
        connection = None
        try:
            end = self.attempt_deadline(deadline, attempts_left)
            connection = self._connection(end)
            headers = sign_request("POST", self.url, [("Content-Type", JSON_CONTENT_TYPE), ("X-Amz-Target", target)],
                                   body, credentials, self.region, self.aws_service, datetime.now(timezone.utc))
            self.stats.add("aws_calls")
            status, data, reusable = exchange(connection, "POST", self.path, headers, body, end)
            # Not past its deadline either: an exchange that ends late was frozen midway (a
            # Lambda freeze) or stalled, and its connection is not trusted with another.
            if reusable and self.clock() <= end and (status == 200 or 400 <= status < 600):
                self._release(connection)
                connection = None
        except socket.timeout:
            raise UpstreamTimeout(f"{self.aws_service} did not answer in time") from None
        except HttpProtocolError as error:  # refused by the grammar, or over the cap: closed below
            raise UpstreamInvalidResponse(f"{self.aws_service} answered: {error}") from None
        except OSError as error:
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or ""
            detail = f"{self.aws_service} unreachable: {type(error).__name__} {reason}".rstrip()
            raise UpstreamUnreachable(detail) from error
        finally:
            if connection is not None:
                connection.close()
            self._connections.release()
        if status == 200:
            try:
                return json.loads(data)
            except (ValueError, RecursionError):
                raise UpstreamInvalidResponse(f"{self.aws_service} answered 200 with a body that is not JSON") from None
        if 400 <= status < 600:
            raise aws_error(status, data)
        raise UpstreamInvalidResponse(f"{self.aws_service} answered status {status}")

    def _connection(self, deadline):
        """The newest idle connection that is still in step with AWS, else a new one."""
        now = self.clock()
        while True:
            with self._lock:
                if not self._idle:
                    break
                connection, last_used = self._idle.pop()
            if now - last_used < IDLE_CONNECTION_SECONDS and not has_leftover(connection):
                return connection
            connection.close()
        return open_connection(self.parts, deadline)

    def _release(self, connection):
        with self._lock:
            self._idle.append((connection, self.clock()))

    def close_idle(self):
        """Close every idle connection (after a snapshot restore they lead nowhere)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()


# ---------------------------------------------------------------------------
# AWS answers: checked against the API's shape, then shaped as the official extension does
# ---------------------------------------------------------------------------

# AWS sends timestamps as epoch seconds; outside 1970 to 9999 it is not a date (and
# time.gmtime would fail on it).
MAX_TIMESTAMP = 253402300799.0
PARAMETER_TYPES = ("String", "StringList", "SecureString")
SECRET_REFERENCE = "/aws/reference/secretsmanager/"
# A selector after the last ':' of a name: a version number or a label.
SELECTOR_SUFFIX = re.compile(r"(.+):([A-Za-z0-9_.-]{1,100})")


def _require(condition, what):
    if not condition:
        raise UpstreamInvalidResponse(f"AWS answered {what}")


def _optional_text(value):
    return value is None or isinstance(value, str)


def _timestamp(value, what):
    """iso8601 text of an epoch-seconds timestamp from AWS, or None when absent."""
    if value is None:
        return None
    _require(isinstance(value, (int, float)) and not isinstance(value, bool)
             and 0 <= value <= MAX_TIMESTAMP, f"a {what} that is not a date")  # NaN fails too
    return iso8601(value)


def parameter_names_match(asked, name, arn):
    """Whether a GetParameter answer (Name, ARN) is for the name asked: by name, by ARN, or
    by an ARN whose resource part is the name; a ':version' or ':label' the caller wrote
    into the name itself is not part of the answer's Name; a Secrets Manager reference
    may be answered under the secret's name."""
    candidates = [asked]
    suffixed = SELECTOR_SUFFIX.fullmatch(asked)
    if suffixed:
        candidates.append(suffixed.group(1))
    if asked.startswith(SECRET_REFERENCE):
        # AWS names the answer by the reference path; moto by the secret's own name.
        candidates.append(asked[len(SECRET_REFERENCE):])
    for candidate in candidates:
        if candidate in (name, arn):
            return True
        if candidate.startswith("arn:") and ":parameter" in candidate:
            resource = candidate.split(":parameter", 1)[1]
            if resource in (name, "/" + name):
                return True
    return False


def secret_ids_match(asked, name, arn):
    """Whether a GetSecretValue answer is for the id asked: its name, its ARN, or its ARN
    without the six random characters Secrets Manager appends (a partial ARN)."""
    return asked in (name, arn) or (len(arn) == len(asked) + 7 and arn.startswith(asked + "-"))


# The official bodies are built from these pieces, so that a batch route can take the
# Parameter object out of a cached /get body, or a secret's entry, by slicing bytes
# rather than parsing JSON (a hit on a batch route stays a few lookups and one join).
PARAMETER_HEAD = b'{"Parameter": '
RESULT_TAIL = b', "ResultMetadata": {}}'


def parameter_object(wire, selector=None):
    """The official Parameter object from one parameter of an AWS answer, checked to have
    the API's shape (GetParameter, GetParameters and GetParametersByPath share it)."""
    _require(isinstance(wire, dict), "a parameter that is not an object")
    name, value, version = wire.get("Name"), wire.get("Value"), wire.get("Version")
    _require(isinstance(name, str) and name, "a parameter without a Name")
    _require(isinstance(value, str), "a parameter whose Value is not text")
    _require(wire.get("Type") in PARAMETER_TYPES, "a parameter of no known Type")
    # Version 0 is real: parameters under /aws/reference/secretsmanager/ answer it.
    _require(isinstance(version, int) and not isinstance(version, bool) and version >= 0,
             "a parameter whose Version is not a whole number")
    for field_name in ("ARN", "DataType", "Selector", "SourceResult"):
        _require(_optional_text(wire.get(field_name)), f"a parameter whose {field_name} is not text")
    return {
        "ARN": wire.get("ARN"),
        "DataType": wire.get("DataType"),
        "LastModifiedDate": _timestamp(wire.get("LastModifiedDate"), "LastModifiedDate"),
        "Name": name,
        # AWS echoes the selector; moto answers null, so the request's own is used then.
        "Selector": wire.get("Selector") or selector,
        "SourceResult": wire.get("SourceResult"),
        "Type": wire.get("Type"),
        "Value": value,
        "Version": version,
    }


def render_parameter(answer, asked, selector):
    """The SDK's GetParameter output as the official extension serialises it, from an
    answer checked to have GetParameter's shape and to be for the name asked."""
    wire = answer.get("Parameter") if isinstance(answer, dict) else None
    _require(isinstance(wire, dict), "GetParameter without a Parameter object")
    parameter = parameter_object(wire, selector)
    _require(parameter_names_match(asked, parameter["Name"], parameter["ARN"] or ""),
             "another parameter than the one asked")
    return PARAMETER_HEAD + json.dumps(parameter).encode("utf-8") + RESULT_TAIL


def secret_entry(answer, asked):
    """The official secret (the SDK's GetSecretValue output without ResultMetadata, which
    is also BatchGetSecretValue's SecretValueEntry), from an answer checked to have the
    API's shape and to be for the id asked. Binary stays the base64 text AWS sent."""
    _require(isinstance(answer, dict), "a secret that is not an object")
    arn, name = answer.get("ARN"), answer.get("Name")
    _require(isinstance(arn, str) and arn and isinstance(name, str) and name, "a secret without a Name and ARN")
    _require(isinstance(answer.get("VersionId"), str), "a secret whose VersionId is not text")
    string, binary = answer.get("SecretString"), answer.get("SecretBinary")
    _require(_optional_text(string) and _optional_text(binary) and (string, binary) != (None, None),
             "a secret with neither a SecretString nor a SecretBinary text")
    stages = answer.get("VersionStages")
    _require(stages is None or (isinstance(stages, list) and all(isinstance(stage, str) for stage in stages)),
             "VersionStages that are not a list of text")
    _require(secret_ids_match(asked, name, arn), "another secret than the one asked")
    return {
        "ARN": arn,
        "CreatedDate": _timestamp(answer.get("CreatedDate"), "CreatedDate"),
        "Name": name,
        "SecretBinary": binary,
        "SecretString": string,
        "VersionId": answer.get("VersionId"),
        "VersionStages": stages,
    }


def render_secret(answer, asked):
    """The SDK's GetSecretValue output as the official extension serialises it."""
    return json.dumps(secret_entry(answer, asked)).encode("utf-8")[:-1] + RESULT_TAIL


def _list_of(answer, field_name, optional=False):
    value = answer.get(field_name)
    if value is None and optional:
        return []
    _require(isinstance(value, list), f"{field_name} that is not a list")
    return value


def split_parameters(answer, asked):
    """{asked text: rendered /get body, or ItemError} from a GetParameters answer for the
    names asked, [(asked text, name, selector)], no two for one parameter (see
    ParameterBatch.fetch), each checked as GetParameter's would be. Every name asked must be
    answered, and nothing else: a parameter is matched to the name asked that it is for
    (by name or ARN; by Version for a version selector; by Selector when AWS echoes one)."""
    _require(isinstance(answer, dict), "GetParameters that is not an object")
    wires = _list_of(answer, "Parameters")
    invalid = _list_of(answer, "InvalidParameters", optional=True)
    _require(all(isinstance(name, str) for name in invalid), "InvalidParameters that are not text")
    invalid = set(invalid)
    parameters = [parameter_object(wire) for wire in wires]
    taken = [False] * len(parameters)
    results = {}
    for text, _, selector in asked:
        if text in invalid:
            kind = "ParameterVersionNotFound" if selector and selector[1:].isdigit() else "ParameterNotFound"
            results[text] = ItemError(kind, f"Parameter {text} not found.")
            continue
        for index, parameter in enumerate(parameters):
            if taken[index] or not parameter_names_match(text, parameter["Name"], parameter["ARN"] or ""):
                continue
            if parameter["Selector"] is not None and parameter["Selector"] != selector:
                continue
            if selector and selector[1:].isdigit() and parameter["Version"] != int(selector[1:]):
                continue
            taken[index] = True
            parameter["Selector"] = parameter["Selector"] or selector
            results[text] = PARAMETER_HEAD + json.dumps(parameter).encode("utf-8") + RESULT_TAIL
            break
        else:
            raise UpstreamInvalidResponse(f"GetParameters without {shown(text)!r} among its answers")
    _require(all(taken), "GetParameters with a parameter that was not asked")
    return results


def split_secrets(answer, asked):
    """{secret id: rendered /get body, or ItemError} from a BatchGetSecretValue answer for
    the ids asked. Every id must be answered, by a SecretValues entry or an Errors entry."""
    _require(isinstance(answer, dict), "BatchGetSecretValue that is not an object")
    entries = _list_of(answer, "SecretValues")
    errors = _list_of(answer, "Errors", optional=True)
    results = {}
    for error in errors:
        _require(isinstance(error, dict) and error.get("SecretId") in asked
                 and isinstance(error.get("ErrorCode"), str) and _optional_text(error.get("Message")),
                 "an Errors entry that is not for an id asked")
        code = error["ErrorCode"] if AWS_ERROR_TYPE.fullmatch(error["ErrorCode"]) else "UnknownError"
        results[error["SecretId"]] = ItemError(code, (error.get("Message") or "")[:1024])
    for entry in entries:
        _require(isinstance(entry, dict), "a SecretValues entry that is not an object")
        name, arn = entry.get("Name"), entry.get("ARN")
        name, arn = (name, arn) if isinstance(name, str) and isinstance(arn, str) else ("", "")
        matched = [secret_id for secret_id in asked if secret_ids_match(secret_id, name, arn)]
        _require(matched, "a secret that was not asked")
        for secret_id in matched:  # a name and an ARN asked together are one secret
            results[secret_id] = render_secret(entry, secret_id)
    _require(len(results) == len(asked), "BatchGetSecretValue that leaves an id asked unanswered")
    return results


# ---------------------------------------------------------------------------
# Cache: TTL + LRU on two clocks, one AWS call per miss, stale answers
# ---------------------------------------------------------------------------

def describe_key(key):
    """A key for a log line: service and name or id, never a value."""
    return f"{key[0]} {shown(repr(key[1]))}"


INFINITY = float("inf")


def drop_oldest(entries, over):
    """Drop the entries of an OrderedDict from its old end while over(value) holds."""
    while entries:
        key, value = next(iter(entries.items()))
        if not over(value):
            return
        del entries[key]


class TTLCache:
    """A least-recently-used cache whose entries also expire.

    Entries live in an OrderedDict from least to most recently used, each
    (value, expiry on clock, expiry on wall, refresh point on clock: ahead, a share of the
    TTL, after the put; never when ahead is 0). An entry is fresh only while both clocks
    are before its expiry: the monotonic clock cannot be set back, and the wall clock
    counts the time a paused or snapshot-restored VM was not running, which the monotonic
    one does not (docs/design.md, "SnapStart"). Expired entries are kept max_stale
    seconds more, to answer when AWS fails; past that they are dead and dropped.
    Lock rule: self._lock guards self._entries and is held only for the dictionary
    operations of one method call, never during I/O or a call out."""

    def __init__(self, max_items, max_stale=0.0, clock=time.monotonic, wall=time.time, ahead=0.0):
        self.max_items, self.max_stale, self.clock, self.wall, self.ahead = max_items, max_stale, clock, wall, ahead
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        """The value if fresh, else None. A hit becomes the most recently used."""
        return self.get_many((key,)).get(key)

    def get_many(self, keys, due=None):
        """{key: value} for those of keys that are fresh, each hit becoming the most
        recently used, under one lock and one reading of the clocks; a dead entry met on
        the way is dropped. due: a list to which the hits past their refresh point are added."""
        found = {}
        with self._lock:
            now, wall_now = self.clock(), self.wall()
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if now < entry[1] and wall_now < entry[2]:
                    self._entries.move_to_end(key)      # LRU: used now
                    found[key] = entry[0]
                    if due is not None and now >= entry[3]:
                        due.append(key)
                elif self._dead(entry, now, wall_now):
                    del self._entries[key]
        return found

    def get_stale(self, key):
        """A value, expired or not, still within max_stale seconds of its expiry, else None."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None or self._dead(entry, self.clock(), self.wall()) else entry[0]

    def _dead(self, entry, now, wall_now):
        """Past any stale use, on either clock."""
        return now >= entry[1] + self.max_stale or wall_now >= entry[2] + self.max_stale

    def put(self, key, value, ttl):
        with self._lock:
            now, wall_now = self.clock(), self.wall()
            self._entries[key] = (value, now + ttl, wall_now + ttl, now + ttl * self.ahead if self.ahead else INFINITY)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)   # evict the least recently used
            # Drop dead entries at the cold end while there are any: keeps memory to
            # what can still be served, at O(1) amortised cost per put.
            drop_oldest(self._entries, lambda entry: self._dead(entry, now, wall_now))

    def discard(self, key):
        with self._lock:
            self._entries.pop(key, None)

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        with self._lock:
            return len(self._entries)


class Stats:
    """Counters for the shutdown summary and the metrics line."""

    # Each counter, and its name as a CloudWatch metric (PARAMETERS_SECRETS_EXTENSION_METRICS=emf).
    METRICS = {"hits": "Hits", "misses": "Misses", "aws_calls": "AwsCalls", "errors": "Errors",
               "stale": "StaleAnswers", "refreshed_ahead": "RefreshedAhead"}
    NAMES = tuple(METRICS)

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name, count=1):
        with self._lock:
            self._counts[name] += count

    def snapshot(self):
        with self._lock:
            return dict(self._counts)


class _Flight:
    """One AWS call in progress for a key; the requests that wait for it share its result."""

    __slots__ = ("done", "value", "cache_status", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value = self.cache_status = self.error = None


# refreshNow makes at most one AWS call per key in this many seconds: a refresh that
# comes sooner shares the previous refresh's result, so that a loop in function code
# cannot turn into a storm on the account's shared quota (Parameter Store: 40 calls a
# second by default). docs/http-api.md, "refreshNow".
REFRESH_INTERVAL = 1.0
# How long a request with no budget waits for another request's AWS call for the same
# key: longer than that call can last (throttled retries start within THROTTLE_WINDOW;
# then its attempts, backoffs and a credentials fetch).
WAIT_WITHOUT_BUDGET = (THROTTLE_WINDOW + MAX_ATTEMPTS * (ATTEMPT_TIMEOUT_WITHOUT_BUDGET + BACKOFF_CAP)
                       + CREDENTIALS_FETCH_SECONDS)


class Store:
    """The cache, the rule of one AWS call per miss, refreshNow's rate, refreshes ahead of
    expiry, and stale values when AWS fails transiently.

    A call (call(keys, deadline) -> {key: value or UpstreamError}) is made for the keys a
    request leads, with the request's deadline; a refresh ahead is made in a thread of its
    own, with that deadline or, without one, ATTEMPT_TIMEOUT_WITHOUT_BUDGET: so a refresh
    that a Lambda freeze cuts ends at thaw, past its deadline, and is dropped. (Not by the
    events seen: at thaw, a request and Lambda's next event come at once, in any order.)
    Lock rule: self._lock guards self._flights and self._refreshes only; the AWS call is
    made with no lock held, and a request waits for another's call only until its own
    deadline."""

    def __init__(self, cache, stats, log, clock=time.monotonic):
        self.cache, self.stats, self.log, self.clock = cache, stats, log, clock
        self._flights = {}                 # key -> _Flight in progress
        self._refreshes = OrderedDict()    # key -> (started, value, error), oldest first
        self._lock = threading.Lock()
        self.stopped = False               # after SHUTDOWN nothing is refreshed

    def get(self, key, call, ttl, refresh=False, deadline=None):
        """(value, cache status) for key, status one of hit / miss / stale / bypass.
        call(deadline) makes the AWS call and returns the value; ttl 0 means this key is
        never cached; deadline (monotonic, or None) bounds the call and any wait for another
        request's. The rules are get_many's, for one key; a hit takes the short way."""
        if ttl and not refresh:
            due = []
            value = self.cache.get_many((key,), due).get(key)
            if value is not None:
                self.stats.add("hits")
                if due:
                    self._refresh_ahead(due, lambda keys, deadline: {key: call(deadline)}, ttl, deadline)
                return value, "hit"
        outcome = self.get_many([key], lambda keys, deadline: {key: call(deadline)}, ttl, refresh, deadline)[key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def get_many(self, keys, call, ttl, refresh=False, deadline=None):
        """{key: (value, cache status) or the UpstreamError for it} for distinct keys, under
        the same rules as get, key by key: hits from the cache (starting a refresh ahead of
        those past their refresh point), refreshNow's rate per key, one flight per key (a
        key another request is fetching is waited for, not fetched again), and stale values.
        call(keys, deadline) fetches the keys this request leads, in as few AWS calls as it
        likes, and returns {key: value or UpstreamError}; when it raises an UpstreamError,
        every one of those keys has that error."""
        due = []
        begun = self.begin(keys, ttl, refresh, due)
        self._refresh_ahead(due, call, ttl, deadline)
        return self.settle(begun, call, ttl, refresh, deadline)

    def begin(self, keys, ttl, refresh=False, due=None):
        """get_many's first half, which never waits: the hits (those past their refresh
        point added to due), refreshNow's recent results, and a flight for each other key,
        led by this caller unless another request leads one. The caller must pass what it
        returns to settle(): until then other requests wait on the flights it leads
        (prefetch begins before serving starts)."""
        results = {}
        if ttl and not refresh:
            found = self.cache.get_many(keys, due)
            self.stats.add("hits", len(found))
            results = {key: (value, "hit") for key, value in found.items()}
        led, followed = [], []
        for key in keys if ttl and refresh else ():
            with self._lock:
                recent = self._refreshes.get(key)
            if recent is not None and self.clock() - recent[0] < REFRESH_INTERVAL:  # refreshNow's rate: its result
                _, value, error = recent
                self.stats.add("hits" if error is None else "errors")
                results[key] = (value, "hit") if error is None else self._stale_or_error(key, ttl, error)
        with self._lock:
            for key in keys:
                if key not in results:
                    flight = self._flights.get(key)
                    if flight is None:
                        led.append((key, self._flights.setdefault(key, _Flight())))
                    else:
                        followed.append((key, flight))
        return results, led, followed

    def settle(self, begun, call, ttl, refresh=False, deadline=None, ahead=False):
        """get_many's second half: the AWS call for the keys led, and the wait (until the
        deadline) for those another request is fetching. ahead: the keys led are refreshed
        ahead (not a miss, nor refreshNow)."""
        results, led, followed = begun
        if led:
            try:
                self._miss_many(led, call, ttl, refresh, deadline, results, ahead)
            except BaseException as error:
                for key, flight in led:
                    if key not in results:
                        flight.error = error
                raise
            finally:
                with self._lock:
                    for key, _ in led:
                        del self._flights[key]
                for _, flight in led:
                    flight.done.set()
        for key, flight in followed:
            wait = WAIT_WITHOUT_BUDGET if deadline is None else deadline - self.clock()
            done = flight.done.wait(max(0.0, wait))
            error = flight.error if done else UpstreamTimeout("waited for another request's AWS call")
            # Counted as the leader counts its own answer (whoever called AWS): the hit it
            # found while queued, else a miss, and an error when it failed.
            self.stats.add("hits" if error is None and flight.cache_status == "hit" else "misses")
            if error is not None:
                self.stats.add("errors")
                results[key] = self._stale_or_error(key, ttl, error)
            else:
                results[key] = (flight.value, flight.cache_status)
        return results

    def _refresh_ahead(self, keys, call, ttl, deadline):
        """Refresh keys (hits past their refresh point) in a thread, but those another
        request is fetching and those refreshed within REFRESH_INTERVAL, and nothing once
        stopped. The caller does not wait: it has its value."""
        if not keys or self.stopped:
            return
        led = []
        with self._lock:
            now = self.clock()
            for key in keys:
                recent = self._refreshes.get(key)
                if key not in self._flights and (recent is None or now - recent[0] >= REFRESH_INTERVAL):
                    led.append((key, self._flights.setdefault(key, _Flight())))
        if led:
            if deadline is None:
                deadline = now + ATTEMPT_TIMEOUT_WITHOUT_BUDGET
            args = (({}, led, []), call, ttl, False, deadline, True)
            try:  # _thread: see Listener._accept
                _thread.start_new_thread(self._settle_quietly, args)
            except (RuntimeError, MemoryError):
                self._settle_quietly(*args)

    def _settle_quietly(self, *args):
        try:
            self.settle(*args)
        except Exception as error:  # a bug: one line, as a request's would be (no traceback on stderr)
            self.log.error(f"internal error in a refresh ahead: {type(error).__name__}")

    def _miss_many(self, led, call, ttl, refresh, deadline, results, ahead):
        missing = []
        for key, flight in led:
            value = self.cache.get(key) if ttl and not (refresh or ahead) else None  # filled while we queued
            if value is not None:
                self.stats.add("hits")
                flight.value, flight.cache_status = results[key] = (value, "hit")
            else:
                self.stats.add("refreshed_ahead" if ahead else "misses")
                missing.append((key, flight))
        if not missing:
            return
        started = self.clock()
        try:
            values = call([key for key, _ in missing], deadline)
        except UpstreamError as error:
            values = {}
            failure = error
        else:
            failure = UpstreamInvalidResponse("a batch answer that leaves a key out")
        # A refresh ahead that ends past its deadline (a Lambda freeze cut it, or AWS was
        # that slow), or after SHUTDOWN, is dropped: the entry stays as it was, and nobody
        # is told but at debug.
        dropped = ahead and (self.stopped or self.clock() > deadline)
        for key, flight in missing:
            value = values.get(key, failure)
            if isinstance(value, UpstreamError):
                self.stats.add("errors")
                if not (ahead or value.transient):
                    self.cache.discard(key)
                elif ahead and not dropped:
                    self.log.warn(f"refreshing {describe_key(key)} ahead of its expiry failed ({value}); "
                                  "the cached value stays until it expires")
                if ttl and (refresh or ahead):
                    self._remember_refresh(key, started, None, value)
                # A refresh ahead has no caller: those who joined it try the stale value themselves.
                outcome = value if ahead else self._stale_or_error(key, ttl, value)
            else:
                if ttl and (refresh or ahead):
                    self._remember_refresh(key, started, value, None)
                elif ttl:
                    with self._lock:
                        self._refreshes.pop(key, None)  # an ordinary fetch: refreshNow's next one calls AWS
                if ttl and not dropped:
                    self.cache.put(key, value, ttl)
                outcome = (value, "miss" if ttl else "bypass")
            if dropped:
                self.log.debug(f"a refresh ahead of {describe_key(key)} ended past its deadline or the stop: dropped")
            if isinstance(outcome, tuple):
                flight.value, flight.cache_status = outcome
            else:
                flight.error = outcome
            results[key] = outcome

    def _stale_or_error(self, key, ttl, error):
        """(stale value, "stale") when one may answer for a transient error, else the error."""
        stale = self.cache.get_stale(key) if ttl and getattr(error, "transient", False) else None
        if stale is None:
            return error
        self.stats.add("stale")
        self.log.warn(f"serving a stale value for {describe_key(key)}: AWS failed ({error})")
        return stale, "stale"

    def _remember_refresh(self, key, started, value, error):
        with self._lock:
            self._refreshes[key] = (started, value, error)
            self._refreshes.move_to_end(key)
            # Only the last second matters: drop older records from the old end.
            now = self.clock()
            drop_oldest(self._refreshes, lambda record: now - record[0] >= REFRESH_INTERVAL)

    def clear(self):
        """Drop every cached value (after a snapshot restore)."""
        self.cache.clear()
        with self._lock:
            self._refreshes.clear()

# ---------------------------------------------------------------------------
# Queries: the query string read strictly, and the keys and values each route takes
# ---------------------------------------------------------------------------

MAX_NAME_LENGTH = 2048  # SSM parameter names and Secrets Manager ids: 2048 at most
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# C0, DEL and C1: no parameter name or secret id holds one, and a C1 such as U+009B (CSI)
# would reach a terminal as an escape sequence wherever the value is printed.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# An unknown query key is echoed this far: enough to recognise a typo, too little to
# carry anything pasted by mistake (docs/http-api.md, "Errors").
ECHOED_KEY_LENGTH = 16


def _decode(text):
    if "%" not in text and text.isascii() and not CONTROL_CHARACTERS.search(text):
        return text  # the common case: nothing to decode
    if BAD_ESCAPE.search(text):
        raise ClientError(400, "MalformedQuery", "the query has an invalid percent-encoding")
    try:
        # The request line arrives decoded as Latin-1: undo that to get the raw bytes.
        decoded = unquote_to_bytes(text.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ClientError(400, "MalformedQuery", "the query is not valid UTF-8") from None
    if CONTROL_CHARACTERS.search(decoded):
        raise ClientError(400, "MalformedQuery", "the query holds a control character")
    return decoded


def parse_query(query):
    """[(key, value)] from a query string, strictly: bad %-escapes, bytes that are not
    UTF-8 and control characters are refused. '+' stays '+' (secret names may hold it;
    no name may hold a space), unlike form decoding."""
    pairs = []
    for part in query.split("&") if query else ():
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        pairs.append((_decode(raw_key), _decode(raw_value)))
    return pairs


def single_values(pairs, allowed):
    """{key: value} with unknown and repeated keys refused. A near-miss unknown key (a
    typo such as withdecryption) is named with the intended key: it must not silently
    return ciphertext."""
    values = {}
    for key, value in pairs:
        if key not in allowed:
            hint = next((known for known in allowed if known.lower() == key.lower()), None)
            if hint is None:
                import difflib

                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
                hint = close[0] if close else None
            suffix = f"; did you mean {hint!r}?" if hint else f"; known keys: {', '.join(allowed)}"
            raise ClientError(400, "UnknownQueryKey", f"unknown query key {shown(key, ECHOED_KEY_LENGTH)!r}{suffix}")
        if key in values:
            raise ClientError(400, "RepeatedQueryKey", f"query key {key!r} is given more than once")
        values[key] = value
    return values


# withDecryption takes true / false as the official extension does; refreshNow also
# takes 1 / 0, as the open Secrets Manager Agent's refreshNow does. Any case.
BOOLEAN_WORDS = {
    "withDecryption": {"true": True, "false": False},
    "refreshNow": {"true": True, "false": False, "1": True, "0": False},
    "recursive": {"true": True, "false": False},
}


def _boolean(values, key):
    value = values.get(key)
    if value is None:
        return False
    words = BOOLEAN_WORDS[key]
    try:
        return words[value.lower()]
    except KeyError:
        raise ClientError(400, "InvalidQueryValue", f"{key} must be {' or '.join(words)} (any case)") from None


def _identifier(values, key, what):
    value = values.get(key)
    if value is None:
        raise ClientError(400, "MissingQueryKey", f"the query key {key!r} ({what}) is required")
    if not value:
        raise ClientError(400, "InvalidQueryValue", f"{key} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ClientError(400, "InvalidQueryValue", f"{key} is longer than {MAX_NAME_LENGTH} characters")
    return value


PARAMETER_KEYS = ("name", "version", "label", "withDecryption", "refreshNow", "jsonKey", "format")
SECRET_KEYS = ("secretId", "versionId", "versionStage", "refreshNow", "jsonKey", "format")
PATH_KEYS = ("path", "recursive", "withDecryption", "refreshNow")
NAMES_KEYS = ("names", "withDecryption", "refreshNow")
SECRET_IDS_KEYS = ("secretIds", "refreshNow")


def _projection(values):
    """(jsonKey or None, whether format=raw) of a /get query."""
    json_key = values.get("jsonKey")
    if json_key is not None and not 1 <= len(json_key) <= MAX_NAME_LENGTH:
        raise ClientError(400, "InvalidQueryValue", f"jsonKey must be 1 to {MAX_NAME_LENGTH} characters")
    form = values.get("format")
    if form is not None and form.lower() not in ("json", "raw"):
        raise ClientError(400, "InvalidQueryValue", "format must be raw or json (any case)")
    return json_key, form is not None and form.lower() == "raw"


def _list(values, key, what, limit):
    """The distinct comma-separated items of a required list key, in the order given."""
    text = values.get(key)
    if text is None:
        raise ClientError(400, "MissingQueryKey", f"the query key {key!r} ({what}, comma-separated) is required")
    items = text.split(",")
    if len(items) > limit:
        raise ClientError(400, "InvalidQueryValue", f"{key} holds {len(items)} items; at most {limit} are taken")
    for item in items:
        if not item:
            raise ClientError(400, "InvalidQueryValue", f"{key} holds an empty item")
        if len(item) > MAX_NAME_LENGTH:
            raise ClientError(400, "InvalidQueryValue", f"{key} holds an item longer than {MAX_NAME_LENGTH} characters")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------
# Lookups and batches: what a request reads, and the AWS calls that read it
# ---------------------------------------------------------------------------

TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
CACHE_HEADER = "X-Parameters-Secrets-Cache"
CONTENT_TYPE = "Content-Type"  # sent as application/json unless an answer names another
TEXT_TYPE = "text/plain; charset=utf-8"
BINARY_TYPE = "application/octet-stream"
# An item of a batch is listed in its answer for these errors; any other fails the request.
PARAMETER_NOT_FOUND = ("ParameterNotFound", "ParameterVersionNotFound")
MAX_NAMES = 50               # get-multiple (docs/http-api.md)
NAMES_PER_CALL = 10          # GetParameters takes at most 10 names
MAX_SECRET_IDS = 20          # BatchGetSecretValue takes at most 20 ids
MAX_PATH_PARAMETERS = 1000   # get-by-path; also what bounds the pages read and their size
PATH_PAGE_SIZE = 10          # GetParametersByPath's largest MaxResults
# Without a budget, all the pages of one path end within this from the first call (a
# page that comes slowly, page after page, must not hold the request and its waiters for
# hours): a 100-page path takes a few seconds, and the waiters' own limit
# (WAIT_WITHOUT_BUDGET) is longer.
PAGES_WITHOUT_BUDGET = 30.0


def _no_constant(text):
    raise ValueError(f"{text} is not JSON")  # json.loads takes NaN and Infinity otherwise


def json_member(text, json_key):
    """The value of json_key in text, a JSON object. The errors name the key, never the value."""
    try:
        document = json.loads(text, parse_constant=_no_constant) if text is not None else None
    except (ValueError, RecursionError):
        document = None
    shown_key = shown(json_key, 100)
    if not isinstance(document, dict):
        raise ClientError(400, "ValueNotJsonObject", f"the value is not a JSON object, so it has no key {shown_key!r}")
    if json_key not in document:
        raise ClientError(404, "JsonKeyNotFound", f"the value has no key {shown_key!r}")
    return document[json_key]


def project(aws_service, body, json_key, raw, cache_status):
    """(headers, body) of a /get answer that asked for jsonKey or format=raw, computed from
    the cached official body: the cache holds each value once."""
    document = json.loads(body)
    if aws_service == "ssm":
        text, binary = document["Parameter"]["Value"], None
    else:
        text, binary = document["SecretString"], document["SecretBinary"]
    if json_key is not None:
        value = json_member(text, json_key)
        if not raw:
            return ((CACHE_HEADER, cache_status),), json.dumps({"Value": value, "ResultMetadata": {}}).encode("utf-8")
        text = value if isinstance(value, str) else json.dumps(value)
    if text is None:
        import base64  # only for a binary secret asked raw

        try:
            data = base64.b64decode(binary, validate=True)
        except ValueError:  # binascii.Error
            raise UpstreamInvalidResponse("a SecretBinary that is not base64") from None
        return ((CONTENT_TYPE, BINARY_TYPE), (CACHE_HEADER, cache_status)), data
    return ((CONTENT_TYPE, TEXT_TYPE), (CACHE_HEADER, cache_status)), text.encode("utf-8", "replace")


def batch_status(statuses):
    """The cache header of a batch answer from its items' (an item listed as an error
    counts as miss, or bypass): stale if any was, else miss if AWS was called for any,
    else bypass or hit."""
    return next((status for status in ("stale", "miss", "bypass") if status in statuses), "hit")


def run_concurrently(functions, clock, deadline):
    """[function() for each], the first in this thread and each other in a thread of its
    own, waiting for each until the deadline (monotonic on clock, or None: for
    WAIT_WITHOUT_BUDGET) and a little more, since each function is bounded by that
    deadline itself. A function still running then, or that failed, gives its exception
    (UpstreamTimeout for the first)."""
    results = [None] * len(functions)
    events = []

    def run(index, event):
        try:
            results[index] = functions[index]()
        except Exception as error:  # handed to the caller, who answers it
            results[index] = error
        finally:
            event.set()

    for index in range(1, len(functions)):
        event = threading.Event()
        try:  # _thread: Thread.start() can wait for ever under memory pressure (docs/pitfalls.md)
            _thread.start_new_thread(run, (index, event))
        except (RuntimeError, MemoryError):
            run(index, event)
        events.append(event)
    if functions:
        run(0, threading.Event())
    for index, event in enumerate(events, 1):
        wait = WAIT_WITHOUT_BUDGET if deadline is None else deadline - clock() + 0.5
        if not event.wait(max(0.0, wait)):
            results[index] = UpstreamTimeout("a concurrent AWS call did not end in time")
    return results


class Lookup:
    """One value, as /get reads it: the cache key, the AWS call (target and payload), how
    its answer is checked and shaped (render: answer -> bytes to serve), and the
    projection asked (json_key: jsonKey or None; raw: format=raw)."""

    def __init__(self, aws_service, key, target, payload, render, refresh, json_key=None, raw=False):
        self.aws_service, self.key, self.target, self.payload, self.render = aws_service, key, target, payload, render
        self.refresh, self.json_key, self.raw = refresh, json_key, raw

    def describe(self):
        return describe_key(self.key)

    def fetch(self, client, deadline):
        return client.call(self.target, self.payload, deadline, self.render)

    def serve(self, service):
        value, cache_status = service.get(self)
        if self.json_key is None and not self.raw:
            return ((CACHE_HEADER, cache_status),), value
        return project(self.aws_service, value, self.json_key, self.raw, cache_status)


class PathLookup(Lookup):
    """get-by-path: one cache entry for a whole (path, recursive, withDecryption), filled
    by GetParametersByPath page after page (NextToken) within one budget."""

    def fetch(self, client, deadline):
        path, recursive = self.key[1], self.key[2]
        prefix = path if path.endswith("/") else path + "/"

        def page(answer):
            _require(isinstance(answer, dict), "GetParametersByPath that is not an object")
            token = answer.get("NextToken")
            _require(token is None or (isinstance(token, str) and token), "a NextToken that is not text")
            parameters = []
            for wire in _list_of(answer, "Parameters"):
                parameter = parameter_object(wire)
                rest = parameter["Name"][len(prefix):]
                _require(parameter["Name"].startswith(prefix) and rest and (recursive or "/" not in rest),
                         "a parameter that is not under the path asked")
                parameters.append(parameter)
            return parameters, token

        parameters, token = [], None
        if deadline is None:
            deadline = client.clock() + PAGES_WITHOUT_BUDGET
        # A page holds 1 to 10 parameters, or none: this many pages is the most 1,000 can take.
        for _ in range(MAX_PATH_PARAMETERS + 1):
            payload = dict(self.payload, NextToken=token) if token else self.payload
            found, token = client.call(self.target, payload, deadline, page)
            parameters.extend(found)
            if len(parameters) > MAX_PATH_PARAMETERS:
                raise TooManyParameters(MAX_PATH_PARAMETERS)
            if token is None:
                return json.dumps({"Parameters": parameters, "NextToken": None, "ResultMetadata": {}}).encode("utf-8")
        raise UpstreamInvalidResponse("GetParametersByPath pages that do not end")


def split_selector(text):
    """(name, selector or None) of a name as GetParameters takes it: '/a:3' is ('/a', ':3'),
    the key /get uses for name=/a&version=3. A Secrets Manager reference by ARN ends in the
    secret's name after ':secret:', which is no selector."""
    match = SELECTOR_SUFFIX.fullmatch(text) if ":" in text else None
    if match is None or match.group(1).endswith(":secret"):
        return text, None
    return match.group(1), ":" + match.group(2)


class Batch:
    """A batch of items (texts: names or ids as asked), each read from and stored in the
    /get cache entry of that item (keys, in the same order), fetched in as few calls of
    the batch action (target) as it allows, made at the same time. get-multiple,
    batch-get and prefetch groups are batches. A subclass says how items share calls
    (chunks, payload, split) and how an item is shown in the batch answer (entry, listed)."""

    def __init__(self, texts, keys, refresh):
        self.texts, self.keys, self.refresh = texts, keys, refresh

    def describe(self):
        return f"{self.aws_service} {len(self.texts)} items, first {shown(self.texts[0])!r}"

    def fetch(self, client, keys, deadline):
        """{key: body or error} for keys (those of this batch that this request leads)."""
        asked = set(keys)
        chunks = self.chunks([(text, key) for text, key in zip(self.texts, self.keys) if key in asked])
        calls = [lambda chunk=chunk: client.call(self.target, self.payload(chunk), deadline,
                                                 lambda answer: self.split(answer, chunk)) for chunk in chunks]
        results = {}
        for chunk, outcome in zip(chunks, run_concurrently(calls, client.clock, deadline)):
            if isinstance(outcome, Exception) and not isinstance(outcome, UpstreamError):
                raise outcome
            for text, key in chunk:
                results[key] = outcome if isinstance(outcome, UpstreamError) else outcome[text]
        return results

    def serve(self, service):
        """The batch route's answer: the items found, and those AWS says are not (listed);
        any other error fails the request."""
        results = service.get_many(self)
        found, failed, statuses = [], [], set()
        for text, key in zip(self.texts, self.keys):
            outcome = results[key]
            if type(outcome) is tuple:
                found.append(self.entry(outcome[0]))
                statuses.add(outcome[1])
            elif (item := self.listed(text, outcome)) is not None:
                failed.append(item)
                statuses.add("miss" if service.ttl[self.aws_service] else "bypass")  # errors are never cached
            else:
                raise outcome
        body = self.head + b", ".join(found) + self.middle + json.dumps(failed).encode("utf-8") + RESULT_TAIL
        return ((CACHE_HEADER, batch_status(statuses)),), body


class ParameterBatch(Batch):
    """GetParameters: names as given (a ':3' or ':label' selector included), 10 a call."""

    aws_service, target, action = "ssm", "AmazonSSM.GetParameters", "ssm:GetParameters"
    head, middle = b'{"Parameters": [', b'], "InvalidParameters": '

    def __init__(self, texts, decrypt, refresh):
        super().__init__(texts, [("ssm",) + split_selector(text) + (decrypt,) for text in texts], refresh)

    def chunks(self, entries):
        # One parameter at most once a call: an answer names /a without its selector
        # (moto never echoes it; in any order), so /a, /a:1 and /a:prod in one call
        # could not be told apart. Asking for several versions of one parameter costs
        # a call each; distinct names fill calls of 10.
        chunks, bases = [], []
        for text, key in entries:
            base = key[1].split(":parameter", 1)[-1].lstrip("/")
            index = next((i for i, chunk in enumerate(chunks)
                          if len(chunk) < NAMES_PER_CALL and base not in bases[i]), len(chunks))
            if index == len(chunks):
                chunks.append([])
                bases.append(set())
            chunks[index].append((text, key))
            bases[index].add(base)
        return chunks

    def payload(self, chunk):
        return {"Names": [text for text, _ in chunk], "WithDecryption": chunk[0][1][3]}

    def split(self, answer, chunk):
        return split_parameters(answer, [(text, key[1], key[2]) for text, key in chunk])

    def entry(self, body):
        return body[len(PARAMETER_HEAD):-len(RESULT_TAIL)]

    def listed(self, text, error):
        return text if isinstance(error, AwsError) and error.error_type in PARAMETER_NOT_FOUND else None


class SecretBatch(Batch):
    """BatchGetSecretValue: secret ids (AWSCURRENT), 20 a call."""

    aws_service, target = "secretsmanager", "secretsmanager.BatchGetSecretValue"
    action = "secretsmanager:BatchGetSecretValue"
    head, middle = b'{"SecretValues": [', b'], "Errors": '

    def __init__(self, ids, refresh):
        super().__init__(ids, [("secretsmanager", secret_id, None, None) for secret_id in ids], refresh)

    def chunks(self, entries):
        return [entries[start:start + MAX_SECRET_IDS] for start in range(0, len(entries), MAX_SECRET_IDS)]

    def payload(self, chunk):
        return {"SecretIdList": [text for text, _ in chunk]}

    def split(self, answer, chunk):
        return split_secrets(answer, [text for text, _ in chunk])

    def entry(self, body):
        return body[:-len(RESULT_TAIL)] + b"}"

    def listed(self, secret_id, error):
        if isinstance(error, ItemError):
            return {"SecretId": secret_id, "ErrorCode": error.error_type, "Message": error.message}
        return None


def parameter_read(name, selector, decrypt, refresh=False, json_key=None, raw=False):
    """The Lookup of one parameter (selector: ':3', ':label' or None), keyed as /get keys it."""
    def render(answer):
        return render_parameter(answer, name, selector)

    return Lookup("ssm", ("ssm", name, selector, decrypt), "AmazonSSM.GetParameter",
                  {"Name": name + (selector or ""), "WithDecryption": decrypt}, render, refresh, json_key, raw)


def parameter_lookup(pairs):
    values = single_values(pairs, PARAMETER_KEYS)
    name = _identifier(values, "name", "the parameter name")
    decrypt = _boolean(values, "withDecryption")
    refresh = _boolean(values, "refreshNow")
    json_key, raw = _projection(values)
    # version and label are both selectors; the official extension uses the one that
    # comes first in the query string and ignores the other (documented behaviour).
    selector = None
    for key, value in pairs:
        if key == "version":
            if not re.fullmatch(r"[1-9][0-9]{0,18}", value):
                raise ClientError(400, "InvalidQueryValue", "version must be a positive whole number")
            selector = ":" + value
            break
        if key == "label":
            if not value or len(value) > 100:
                raise ClientError(400, "InvalidQueryValue", "label must be 1 to 100 characters")
            selector = ":" + value
            break
    return parameter_read(name, selector, decrypt, refresh, json_key, raw)


def secret_read(secret_id, version_id=None, stage=None, refresh=False, json_key=None, raw=False):
    """The Lookup of one secret (a version id or stage, or neither: AWSCURRENT), keyed as /get keys it."""
    def render(answer):
        return render_secret(answer, secret_id)

    payload = {"SecretId": secret_id}
    for field_name, value in (("VersionId", version_id), ("VersionStage", stage)):
        if value is not None:
            payload[field_name] = value
    return Lookup("secretsmanager", ("secretsmanager", secret_id, version_id, stage),
                  "secretsmanager.GetSecretValue", payload, render, refresh, json_key, raw)


def secret_lookup(pairs):
    values = single_values(pairs, SECRET_KEYS)
    secret_id = _identifier(values, "secretId", "the secret name or ARN")
    refresh = _boolean(values, "refreshNow")
    json_key, raw = _projection(values)
    for key, limit in (("versionId", 64), ("versionStage", 256)):
        value = values.get(key)
        if value is not None and not 1 <= len(value) <= limit:
            raise ClientError(400, "InvalidQueryValue", f"{key} must be 1 to {limit} characters")
    return secret_read(secret_id, values.get("versionId"), values.get("versionStage"), refresh, json_key, raw)


# The Lookup of a /get cache key: its service's read, from the rest of the key.
READS = {"ssm": parameter_read, "secretsmanager": secret_read}


def path_lookup(pairs):
    values = single_values(pairs, PATH_KEYS)
    path = _identifier(values, "path", "the parameter path")
    if not path.startswith("/"):
        raise ClientError(400, "InvalidQueryValue", "path must start with '/'")
    recursive = _boolean(values, "recursive")
    decrypt = _boolean(values, "withDecryption")
    payload = {"Path": path, "Recursive": recursive, "WithDecryption": decrypt, "MaxResults": PATH_PAGE_SIZE}
    return PathLookup("ssm", ("ssm-path", path, recursive, decrypt), "AmazonSSM.GetParametersByPath", payload,
                      None, _boolean(values, "refreshNow"))


def names_lookup(pairs):
    values = single_values(pairs, NAMES_KEYS)
    return ParameterBatch(_list(values, "names", "parameter names", MAX_NAMES), _boolean(values, "withDecryption"),
                          _boolean(values, "refreshNow"))


def secret_ids_lookup(pairs):
    values = single_values(pairs, SECRET_IDS_KEYS)
    return SecretBatch(_list(values, "secretIds", "secret names or ARNs", MAX_SECRET_IDS),
                       _boolean(values, "refreshNow"))


# The kinds of a PARAMETERS_SECRETS_EXTENSION_PREFETCH entry and of a wrapper's reference
# (kind:name?query): kind -> (what reads it, its route, and the query key the name is).
ENTRY_KINDS = {"ssm": (parameter_lookup, "/systemsmanager/parameters/get", "name"),
               "secret": (secret_lookup, "/secretsmanager/get", "secretId"),
               "ssm-path": (path_lookup, "/systemsmanager/parameters/get-by-path", "path")}
# ---------------------------------------------------------------------------
# Lambda lifecycle: the Extensions API, and snapshot restores
# ---------------------------------------------------------------------------

def _lambda_error_type(data):
    """errorType from the body of an Extensions API refusal (403 {"errorType": ...})."""
    try:
        found = json.loads(data).get("errorType")
    except (ValueError, AttributeError, RecursionError):
        found = None
    return found if isinstance(found, str) else "unknown"


# Lambda's API is on this host: a connection is made at once or not at all.
CONNECT_TIMEOUT_SECONDS = 10.0


class ExtensionsApi:
    """The calls an external extension makes, over the HTTP client above (HttpConnection):
    Lambda's minimal images do not promise curl, and a process per event would compete
    for the function's small CPU share."""

    def __init__(self, runtime_api):
        """runtime_api: AWS_LAMBDA_RUNTIME_API, host:port. Raises ValueError naming it."""
        self.host, self.port = runtime_api_address(runtime_api)
        self.address = runtime_api
        self.identifier = None

    def _failure(self, call, error):
        what = f"answered {error}" if isinstance(error, HttpProtocolError) else f"unreachable ({type(error).__name__})"
        return f"{call}: Extensions API at {self.address} {what}"

    def _call(self, method, path, headers, body=None, timeout=None):
        """The answer's body; timeout None waits as long as Lambda takes (/event/next)."""
        try:
            status, data, _ = fetch("http", self.host, self.port, method, "/2020-01-01/extension" + path,
                                    [("Host", self.address)] + list(headers.items()),
                                    None if body is None else body.encode("utf-8"),
                                    None if timeout is None else time.monotonic() + timeout,
                                    connect_deadline=time.monotonic() + CONNECT_TIMEOUT_SECONDS)
        except (OSError, HttpProtocolError) as error:
            raise ExtensionsApiError(self._failure(f"{method} {path}", error)) from error
        if status >= 300:
            raise ExtensionsApiError(f"{method} {path}: {status} {_lambda_error_type(data)}")
        return data

    def registered(self, early):
        """Take the early start's /register answer (made before the imports): Lambda's
        information about the function, or ExtensionsApiError."""
        if early.register_error is not None:
            raise ExtensionsApiError(self._failure("POST /register", early.register_error))
        status, identifier, body = early.registration
        if status >= 300:
            raise ExtensionsApiError(f"POST /register: {status} {_lambda_error_type(body)}")
        if not identifier:
            raise ExtensionsApiError("POST /register: no Lambda-Extension-Identifier in the answer")
        self.identifier = identifier
        try:
            info = json.loads(body or b"{}")
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}

    def next_event(self):
        # No timeout: the call blocks until Lambda has an event, however long that is.
        data = self._call("GET", "/event/next", {"Lambda-Extension-Identifier": self.identifier})
        return json.loads(data)

    def report_error(self, phase, error_type, message):
        """POST /init/error or /exit/error; Lambda ends the environment after it."""
        body = json.dumps({"errorMessage": message, "errorType": error_type, "stackTrace": []})
        self._call("POST", f"/{phase}/error", {"Lambda-Extension-Identifier": self.identifier,
                                               "Lambda-Extension-Function-Error-Type": error_type,
                                               "Content-Type": "application/json"}, body, timeout=5)


# A wall clock that moved this much further than the monotonic one means the process
# stood still without knowing it: a snapshot restore, or a clock set by hand. Lambda's
# freeze does not count: the monotonic clock runs on through it (docs/pitfalls.md).
RESTORE_JUMP_SECONDS = 10.0


class Restores:
    """Snapshot restores (docs/design.md, "SnapStart"), seen by the clocks (check: the wall
    clock moved RESTORE_JUMP_SECONDS further than the monotonic one) or told by Lambda (the
    first event after a snap-start INIT). Each calls drop (Service.forget) once, and is
    counted. Lock rule: self._lock guards _offset and count; check reads _offset without
    it, and looks again under it."""

    def __init__(self, drop, clock, wall):
        self.drop, self.clock, self.wall, self.count = drop, clock, wall, 0
        self._offset = wall() - clock()
        self._lock = threading.Lock()

    def check(self):
        if abs(self.wall() - self.clock() - self._offset) > RESTORE_JUMP_SECONDS:
            self.seen(jump=True)

    def seen(self, jump=False):
        """Drop what the snapshot holds; for a jump, unless another thread saw it first."""
        with self._lock:
            if jump and abs(self.wall() - self.clock() - self._offset) <= RESTORE_JUMP_SECONDS:
                return
            self._offset, self.count = self.wall() - self.clock(), self.count + 1
        self.drop("snapshot restore detected")


# ---------------------------------------------------------------------------
# Service: what a request means, and its answer
# ---------------------------------------------------------------------------

PING_BODY = b'{"status": "ok"}'
# Headers that say a proxy forwarded the request. Callers in Lambda are on this host and
# never proxied; a proxied request may be forged server-side (SSRF), so it is refused, as
# the Secrets Manager Agent does.
FORWARDING_HEADERS = ("x-forwarded-for", "forwarded")


class Service:
    """What a request means and what it is answered: one call, answer(), that the HTTP
    transport makes and unit tests drive without a socket. It holds the token, the
    store, the AWS clients and the clocks (clock: monotonic, for deadlines and the cache;
    wall: for expiry across a snapshot restore; sleep: for retry backoff)."""

    # Each route with and without a trailing slash, as the official extension serves them.
    ROUTES = {path + end: route for path, route in (
        ("/systemsmanager/parameters/get", parameter_lookup), ("/secretsmanager/get", secret_lookup),
        ("/systemsmanager/parameters/get-by-path", path_lookup),
        ("/systemsmanager/parameters/get-multiple", names_lookup), ("/secretsmanager/batch-get", secret_ids_lookup),
    ) for end in ("", "/")}

    def __init__(self, config, log, credentials, stats=None, clock=time.monotonic, wall=time.time, sleep=time.sleep):
        self.config, self.log, self.credentials = config, log, credentials
        self.stats = stats or Stats()
        self.clock, self.wall = clock, wall
        self._token = (config.request_token or "").encode("utf-8", "surrogateescape")
        # What a request may not ask and an answer or a log line may not hold (_exposes_token).
        # A token this short (a local AWS_TOKEN such as "x") would be found in anything,
        # so it is not looked for.
        self._guarded_token = config.request_token if len(self._token) >= 8 else None
        cache = TTLCache(config.cache_size, config.max_stale_seconds, clock, wall, config.refresh_ahead / 100)
        self.store = Store(cache, self.stats, log, clock)
        cached = config.cache_enabled and config.cache_size > 0
        self.ttl = {"ssm": config.ssm_ttl if cached else 0,
                    "secretsmanager": config.secrets_ttl if cached else 0}
        self.budget = {"ssm": config.ssm_timeout_ms / 1000.0 or None,
                       "secretsmanager": config.secrets_timeout_ms / 1000.0 or None}
        self.clients = {
            aws_service: ServiceClient(aws_service, endpoint, config.region, credentials, config.max_connections,
                                       self.stats, log, clock, sleep)
            for aws_service, endpoint in (("ssm", config.ssm_endpoint), ("secretsmanager", config.secrets_endpoint))
        }
        self.restores = Restores(self.forget, clock, wall)
        # Services whose batch action (GetParameters, BatchGetSecretValue) IAM denied, each
        # with the batch that found it: their batches are read one call per item for the
        # life of the process.
        self.batch_denied = {}

    def answer(self, method, target, headers):
        """(status, [(header, value)], body) for one request. headers: [(lower-case name,
        value)] as received, repeats kept. Never raises: every failure is answered."""
        request = None
        try:
            self.restores.check()
            if method != "GET":
                raise ClientError(405, "MethodNotAllowed", f"only GET is served, not {method[:16]!r}")
            if any(name in FORWARDING_HEADERS for name, _ in headers):
                raise ClientError(400, "ForwardedRequestRefused",
                                  "requests with X-Forwarded-For or Forwarded are refused")
            path, _, query = target.partition("?")
            if path == "/ping":
                return 200, (), PING_BODY
            route = self.ROUTES.get(path)
            if route is None:
                raise ClientError(404, "NotFound", "unknown path; use /systemsmanager/parameters/get, "
                                                   "get-by-path or get-multiple, or /secretsmanager/get "
                                                   "or batch-get")
            tokens = [value for name, value in headers if name == "x-aws-parameters-secrets-token"]
            if not tokens:
                raise ClientError(401, "MissingToken", f"the header {TOKEN_HEADER} is required")
            if len(tokens) > 1:
                raise ClientError(400, "RepeatedHeader", f"the header {TOKEN_HEADER} is given more than once")
            if not self.token_matches(tokens[0]):
                raise ClientError(403, "InvalidToken", f"the header {TOKEN_HEADER} does not match")
            pairs = parse_query(query)
            if any(self._exposes_token(text) for pair in pairs for text in pair):
                # A token pasted as a name (swapped arguments) would go to AWS, whose
                # request logs (CloudTrail's requestParameters) keep what is asked.
                raise ClientError(400, "TokenInQuery", "a query key or value holds the request token; it is never "
                                                       "sent to AWS nor echoed (is an argument swapped?)")
            request = route(pairs)
            extra, body = request.serve(self)
            return 200, extra, body
        except Exception as error:  # every failure is answered; the server keeps serving
            self._log_failure(method, target, request, error)
            status, extra, body = error_answer(error)
            if self._exposes_token(body.decode("utf-8", "replace")):
                # Nothing asked holds the token (refused above), but an upstream's message might.
                status, extra, body = error_answer(HttpError(status, getattr(error, "error_type", "InternalError"),
                                                             "(message withheld: it quoted the request token)"))
            return status, extra, body

    def token_matches(self, given):
        # Constant time over the content: a wrong last byte takes as long as a wrong first.
        return hmac.compare_digest(given.encode("latin-1", "replace"), self._token)

    def _exposes_token(self, text):
        """Whether text holds the request token, or is 8 characters or more whose first
        ECHOED_KEY_LENGTH (what an unknown key is echoed) are part of it: the one test of
        what a request may ask, an answer may say and a log line may hold."""
        token = self._guarded_token
        return token is not None and (token in text or (len(text) >= 8 and text[:ECHOED_KEY_LENGTH] in token))

    def _log_failure(self, method, target, request, error):
        if not isinstance(error, HttpError):
            # Where it happened, so that a 500 can be found; never a value (no locals).
            frame = error.__traceback__
            while frame is not None and frame.tb_next is not None:
                frame = frame.tb_next
            where = (f" at {os.path.basename(frame.tb_frame.f_code.co_filename)}:{frame.tb_lineno} "
                     f"in {frame.tb_frame.f_code.co_name}") if frame is not None else ""
            self.log.error(f"internal error: {type(error).__name__}{where}")
        elif self.log.enabled("debug"):
            subject = f" ({request.describe()})" if request is not None else ""
            line = (f"{shown(method, 16)} {shown(target.partition('?')[0])}{subject} -> {error.status} "
                    f"{error.error_type}: {shown(error)}")
            self.log.debug(f"a request -> {error.status} {error.error_type} (the rest withheld: it quotes the "
                           "request token)" if any(map(self._exposes_token, line.split())) else line)

    def _deadline(self, aws_service):
        """When a request to aws_service that starts now must be answered (None: no budget)."""
        budget = self.budget[aws_service]
        return self.clock() + budget if budget else None

    def get(self, lookup):
        """(value, cache status) for a parsed request, within its service's budget."""
        client = self.clients[lookup.aws_service]
        return self.store.get(lookup.key, lambda deadline: lookup.fetch(client, deadline), self.ttl[lookup.aws_service],
                              lookup.refresh, self._deadline(lookup.aws_service))

    def get_many(self, batch, begun=None):
        """{key: (value, cache status) or error} for a batch's keys, within its service's
        budget (one deadline for every AWS call the batch makes); begun: what Store.begin
        gave for them, when it was called earlier. Where IAM denies the
        batch action (the official extension asks for ssm:GetParameter alone), the keys
        are read one call each, now and from then on, and one INFO line says so."""
        service = batch.aws_service
        client = self.clients[service]
        deadline = self._deadline(service)

        def denied(outcome):  # AWS's JSON APIs say AccessDeniedException; moto's IAM check AccessDenied
            return type(outcome) is AwsError and outcome.error_type in ("AccessDeniedException", "AccessDenied")

        def call(keys, deadline):
            results = {} if service in self.batch_denied else batch.fetch(client, keys, deadline)
            singles = [key for key in keys if key not in results or denied(results[key])]
            # The first batch to find it says so: setdefault is one step under the GIL.
            if results and singles and self.batch_denied.setdefault(service, batch) is batch:
                self.log.info(f"{batch.target} is denied (AccessDeniedException): {service} batches are "
                              f"read one call per item from now on; allowing {batch.action} in IAM would save calls")
            reads = [READS[service](*key[1:]) for key in singles]
            outcomes = run_concurrently([lambda read=read: read.fetch(client, deadline) for read in reads],
                                        self.clock, deadline)
            for key, outcome in zip(singles, outcomes):
                if isinstance(outcome, Exception) and not isinstance(outcome, UpstreamError):
                    raise outcome
                results[key] = outcome
            return results

        ttl = self.ttl[service]
        return self.store.settle(begun or self.store.begin(batch.keys, ttl, batch.refresh), call, ttl,
                                 batch.refresh, deadline)

    def forget(self, reason):
        """Drop cached values, fetched credentials and idle AWS connections (what a snapshot
        holds: Restores): each is had again when next needed."""
        self.store.clear()
        self.credentials.forget()
        for client in self.clients.values():
            client.close_idle()
        self.log.info(f"{reason}: cache and credentials dropped")

    def prefetch(self, entries):
        """Fill the cache with the configured entries (docs/configuration.md, "Prefetch")
        in as few AWS calls as the APIs allow, all at once within MAX_CONNECTIONS:
        parameters by decryption flag in GetParameters calls of 10, secrets (AWSCURRENT)
        in BatchGetSecretValue calls of 20, each into the entry /get reads; ssm-path trees
        with GetParametersByPath, into the get-by-path entry and each parameter's; the rest
        one call each. Failures are WARNs, never fatal. Returns once the batches' keys are
        claimed (Store.begin), the calls running in a thread: a request for one of those
        values that comes before they are in waits for the prefetch's call."""
        groups, jobs = {}, []
        for entry in entries:
            kind, _, rest = entry.partition(":")
            ident, _, query = rest.partition("?")
            try:
                if kind not in ENTRY_KINDS or not ident:
                    raise ClientError(400, "InvalidPrefetch", "expected ssm:<name>, secret:<id> or ssm-path:<path>, "
                                                              "each [?query]")
                read, _, first = ENTRY_KINDS[kind]
                lookup = read([(first, ident)] + parse_query(query))
            except ClientError as error:
                self.log.warn(f"prefetch of {shown(entry)} failed: {error}")
                continue
            key = lookup.key
            if key[0] == "ssm":
                groups.setdefault(key[3], {})[lookup.payload["Name"]] = entry
            elif key[0] == "secretsmanager" and key[2:] == (None, None):
                groups.setdefault("secrets", {})[key[1]] = entry
            else:
                jobs.append(lambda entry=entry, lookup=lookup: self._prefetch_one(entry, lookup))
        for group, named in groups.items():
            batch = SecretBatch(list(named), False) if group == "secrets" else ParameterBatch(list(named), group, False)
            begun = self.store.begin(batch.keys, self.ttl[batch.aws_service])
            jobs.append(lambda batch=batch, named=named, begun=begun: self._prefetch_batch(batch, named, begun))
        if jobs:
            try:  # _thread: see Listener._accept
                _thread.start_new_thread(run_concurrently, (jobs, self.clock, None))
            except (RuntimeError, MemoryError):
                run_concurrently(jobs, self.clock, None)  # the claimed keys must be settled

    def _prefetch_one(self, entry, lookup):
        try:
            body, _ = self.get(lookup)
            if lookup.key[0] == "ssm-path":  # each parameter of the tree, as /get would hold it
                ttl = self.ttl["ssm"]
                for parameter in json.loads(body)["Parameters"] if ttl else ():
                    self.store.cache.put(("ssm", parameter["Name"], None, lookup.key[3]),
                                         PARAMETER_HEAD + json.dumps(parameter).encode("utf-8") + RESULT_TAIL, ttl)
            self.log.debug(f"prefetched {lookup.describe()}")
        except (ClientError, UpstreamError) as error:
            self.log.warn(f"prefetch of {shown(entry)} failed: {error}")

    def _prefetch_batch(self, batch, named, begun):
        for text, outcome in zip(batch.texts, map(self.get_many(batch, begun).get, batch.keys)):
            if isinstance(outcome, tuple):
                self.log.debug(f"prefetched {shown(text)}")
            else:
                self.log.warn(f"prefetch of {shown(named[text])} failed: {outcome}")

# ---------------------------------------------------------------------------
# HTTP server: the transport. Sockets, answers, keep-alive, admission and the stop; a
# request's head is read by the grammar above, and what it means is Service.answer's
# business.
# ---------------------------------------------------------------------------
#
# Not http.server: its ThreadingHTTPServer and BaseHTTPRequestHandler would have to be
# overridden almost whole to get what Lambda's life needs (docs/design.md, "Transport"):
# header bytes capped while they arrive, an idle keep-alive connection that no timer
# closes (a timer that expires during a freeze fires at thaw, under the caller's next
# request), admission that closes the connection idle longest instead, an accept loop
# that survives a thread that cannot start, and a stop within milliseconds rather than
# at the next poll. What is left is small enough to read here.

REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_DATE = [(None, "")]  # (the second, its Date): formatted once a second, not per answer


def http_date():
    """Now, for the Date header every answer carries (RFC 9110 section 6.6.1), as an
    IMF-fixdate (section 5.6.7). strftime's %a and %b are English here: this process never
    sets a locale (LC_TIME)."""
    second, formatted = _DATE[0]
    if second != int(time.time()):
        second = int(time.time())
        formatted = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        _DATE[0] = second, formatted  # one tuple: a thread never sees half of it
    return formatted


def origin_form(target):
    """The path and query of an absolute-form target (http://host:port/path?query), which a
    server must accept (RFC 9112 section 3.2.2); any other target as it is."""
    scheme, colon_slashes, rest = target.partition("://")
    if not colon_slashes or scheme.lower() not in ("http", "https"):
        return target
    path = rest[len(rest.split("/", 1)[0].split("?", 1)[0]):]  # after the authority
    return path if path.startswith("/") else "/" + path


def has_body(headers):
    """Whether a request (read_request's) says a body follows. A body is never read: after
    one, the next bytes are not a request head, so the connection closes. Content-Length: 0
    is no body (Java's HttpClient sends it on every GET: docs/pitfalls.md)."""
    return body_framing(headers) not in ((None, None), ("length", 0))


def connection_after(method, version, headers):
    """(keep the connection open?, the Connection header to send or None) for a request.
    HTTP/1.0 keep-alive is opt-in, and answered in kind (ApacheBench -k waits for it)."""
    tokens = field_tokens(headers, "connection")
    http10 = version == "HTTP/1.0"
    if method != "GET" or has_body(headers) or "close" in tokens or (http10 and "keep-alive" not in tokens):
        return False, "close"
    return True, "keep-alive" if http10 else None


def format_response(status, headers, body, connection=None, head=False):
    """The bytes of one answer: status line, headers and body, written with one sendall
    (with TCP_NODELAY that is one segment, and no delayed-ACK stall: docs/pitfalls.md).
    Content-Type is application/json unless headers name another (format=raw). To a HEAD
    request (head), no body, and no Content-Length: a GET would be answered another one
    (RFC 9110 sections 9.3.2 and 8.6)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Date: {http_date()}"]
    if all(name != CONTENT_TYPE for name, _ in headers):
        lines.append("Content-Type: application/json")
    if not head:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if connection:
        lines.append(f"Connection: {connection}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def _refuse(sock):
    """429 and close, from the accept thread: never blocks."""
    try:
        sock.setblocking(False)
        try:
            sock.recv(65536)  # drain what was sent, so close() does not reset
        except OSError:
            pass
        sock.sendall(format_response(*error_answer(ClientError(429, "TooManyConnections",
                                                                "too many connections at once; retry")), "close"))
    except OSError:
        pass
    sock.close()


# Closing a socket with unread input makes TCP send a reset, which can destroy the
# answer before the caller reads it (a 431 to a header flood, say). So the server first
# ends its side, then reads and drops what is still coming, within these bounds.
DRAIN_SECONDS = 0.5
DRAIN_BYTES = 1024 * 1024


def _close_after_unread_input(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + DRAIN_SECONDS
        for _ in range(DRAIN_BYTES // RECEIVE_BYTES):  # DRAIN_BYTES at most
            sock.settimeout(_remaining(deadline))  # socket.timeout once DRAIN_SECONDS passed
            if not sock.recv(RECEIVE_BYTES):
                break
    except OSError:
        pass


# How long admission waits, once, before refusing when every place looks busy: a
# connection whose answer was just sent, or whose caller just closed it, is idle or gone
# a moment later. The accept thread waits this at saturation only.
ADMISSION_RETRY_SECONDS = 0.01


class _ClientReader(HttpStream):
    """The reading side of one inbound connection (sock), with the request bytes received
    but not parsed yet (buffer), and its admission state.

    Between requests (deadline None) it waits for the next request with no time limit:
    the socket timeout is only a tick, so that a Lambda freeze, whatever its length,
    never turns into a close under the caller's next request (docs/pitfalls.md, "Freeze").
    Once a request has begun it has a deadline: a silence of one socket timeout ends it,
    and so does a drip, at the first read past the deadline (within twice the read
    timeout at worst; a settimeout per read would be a system call per read).

    Lock rule: admission_lock (Clients's) guards deadline, idle_since and evicted, so that
    a connection is never both taken for eviction and found busy: the first byte of a
    request is only peeked at, and the connection marked busy, before it leaves the
    kernel's buffer. buffer changes only while deadline is set (a request is read)."""

    def __init__(self, sock, admission_lock, read_timeout):
        super().__init__(sock)
        self.admission_lock, self.read_timeout = admission_lock, read_timeout
        self.deadline = None
        self.idle_since = time.monotonic()
        self.evicted = False

    def next_request(self):
        """Wait for the next request's first byte; False at the end (the caller closed,
        or the connection was evicted)."""
        while not self.buffer:  # a pipelined request may be here already
            try:
                if not self.sock.recv(1, socket.MSG_PEEK):
                    return False
                break
            except socket.timeout:
                pass  # idle: the timeout is only a tick
        with self.admission_lock:
            if self.evicted:
                return False
            self.deadline = time.monotonic() + self.read_timeout
        return True

    def answered(self):
        """Idle again: from the moment the answer is out, admission may take it."""
        with self.admission_lock:
            self.idle_since = time.monotonic()
            self.deadline = None

    def receive(self, size):
        if time.monotonic() > self.deadline:
            raise socket.timeout("the request did not arrive in time")
        return self.sock.recv(size)


class Clients:
    """The inbound connections open at once: at most max_clients.

    A newcomer over the limit takes the place of the connection idle longest (waiting
    between requests with nothing received), which is closed; with none idle it is
    refused. Lock rule: self._lock guards self._open and each reader's deadline,
    idle_since and evicted flag; it is held for set operations and zero-timeout checks
    only (the stop's wait too: it sleeps between looks, not holding it)."""

    def __init__(self, max_clients, read_timeout):
        self.max_clients, self.read_timeout = max_clients, read_timeout
        self._open = set()
        self._lock = threading.Lock()

    def admit(self, sock):
        """A _ClientReader for sock, or None when every place is taken by a busy one."""
        for attempt in (1, 2):
            with self._lock:
                full = len(self._open) >= self.max_clients
                victim = self._idle_longest() if full else None
                if not full or victim is not None:
                    if victim is not None:
                        victim.evicted = True
                        self._open.discard(victim)
                    reader = _ClientReader(sock, self._lock, self.read_timeout)
                    self._open.add(reader)
                    break
            if attempt == 2:
                return None
            select.select([], [], [], ADMISSION_RETRY_SECONDS)  # all busy: look once more
        if victim is not None:
            try:  # wakes its thread, which sees the end of the stream and closes
                victim.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return reader

    def _idle_longest(self):
        idle = sorted((reader for reader in self._open if reader.deadline is None), key=lambda r: r.idle_since)
        for reader in idle:
            # Bytes waiting are a request on its way (or an end its thread will see at
            # once): not idle after all.
            if not has_leftover(reader):
                return reader
        return None

    def remove(self, reader):
        with self._lock:
            self._open.discard(reader)

    def wait_answered(self, timeout):
        """Wait, timeout seconds at most, until no request has begun that is not answered
        (every connection idle or gone); False when one still has not been."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if all(reader.deadline is None for reader in self._open):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def serve_connection(reader, service):
    """Answer the requests of one connection until it ends or must close. A request is
    busy (reader.deadline set) from its first byte until its answer is written, or, when
    the connection then closes, until it is closed: Listener.stop waits for it, so that an
    answer computed is an answer sent."""
    sock = reader.sock
    while reader.next_request():
        try:
            method, target, version, headers = read_request(reader)
        except HttpProtocolError as error:
            service.log.debug(f"refused a malformed request: {error.status} {error.error_type}")
            sock.sendall(format_response(*error_answer(ClientError(error.status, error.error_type, str(error))),
                                         "close"))
            _close_after_unread_input(sock)
            return
        keep, connection = connection_after(method, version, headers)
        status, extra, body = service.answer(method, origin_form(target), headers)
        sock.sendall(format_response(status, extra, body, connection, method == "HEAD"))
        if not keep:
            if method != "GET" or has_body(headers):
                _close_after_unread_input(sock)  # a body was not read
            return
        reader.answered()


class Listener:
    """Serves on the listening sockets (127.0.0.1 and, where the host has it, ::1, bound
    by the early start): one accept thread for both, and a thread per admitted
    connection, started by start_thread (function, args): _thread.start_new_thread,
    injectable for tests."""

    def __init__(self, service, sockets, start_thread=_thread.start_new_thread):
        """sockets: listening, non-blocking (bind_loopback's)."""
        self.service, self.sockets, self.start_thread = service, sockets, start_thread
        self.read_timeout = service.config.read_timeout_ms / 1000.0
        self.clients = Clients(service.config.max_clients, self.read_timeout)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._thread.start()
        # One line that a bug report can quote: what runs, and where.
        names = [sock.getsockname()[:2] for sock in self.sockets]
        self.service.log.info(f"version {__version__}, listening on " + " and ".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in names))

    def _accept_loop(self):
        # select, not selectors: three descriptors, among the first the process opens (far
        # below select's limit of 1024).
        while True:
            readable, _, _ = select.select([self._wake_reader, *self.sockets], [], [])
            if self._wake_reader in readable:
                return
            for sock in readable:
                self._accept(sock)

    def _accept(self, listening):
        try:
            sock, _ = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as error:
            # No descriptor or memory for it now (EMFILE, ENFILE, ENOBUFS): it stays in
            # the backlog; pause rather than spin, and let a stop interrupt the pause.
            self._log_safely("warn", f"accept failed ({errno.errorcode.get(error.errno, error.errno)}); "
                                     "trying again shortly")
            select.select([self._wake_reader], [], [], 0.05)
            return
        reader = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            limit_hops(sock)
            sock.settimeout(self.read_timeout)
            reader = self.clients.admit(sock)
            if reader is None:
                _refuse(sock)
                return
            # _thread, not threading.Thread: Thread.start() waits for the new thread to
            # report in, and under memory pressure that wait has been seen never to end
            # (docs/pitfalls.md). Here a thread that cannot start is an exception.
            self.start_thread(self._serve, (reader,))
        except (OSError, RuntimeError, MemoryError) as error:
            if reader is not None:
                self.clients.remove(reader)
            sock.close()
            self._log_safely("warn", f"closed a connection that could not be served ({type(error).__name__})")

    def _serve(self, reader):
        try:
            serve_connection(reader, self.service)
        except Exception as error:  # reset by the peer, a timeout, a bug: one line, no data
            self._log_safely("debug", f"connection ended with {type(error).__name__}")
        finally:
            self.clients.remove(reader)
            reader.sock.close()

    def _log_safely(self, level, message):
        try:
            self.service.log.log(level, message)
        except Exception:  # out of memory while logging: the server must go on all the same
            pass

    def stop(self, grace):
        """Stop accepting at once, then let requests begun be answered within grace seconds."""
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(1.0)
        for sock in self.sockets:
            sock.close()
        if not self.clients.wait_answered(grace):
            self.service.log.warn("stopping with requests still in flight")

# ---------------------------------------------------------------------------
# Values in environment variables: the layer's wrapper (AWS_LAMBDA_EXEC_WRAPPER)
# ---------------------------------------------------------------------------
#
# With AWS_LAMBDA_EXEC_WRAPPER=/opt/<name>/wrapper, Lambda starts the runtime as
# `wrapper <runtime command...>`, after every extension registered (so this extension
# is listening). The wrapper runs this file with --exec-with-values: every reference
# {{ssm:<name>[?query]}} or {{secret:<id>[?query]}} in an environment variable is
# fetched through the running extension over HTTP, like any other request (cached,
# counted, signed), replaced by its value, and the runtime command is exec'd with that
# environment. Any failure stops the start with one line naming the variable, the
# reference and the error type, never a value (docs/env-values.md).

# What starts a reference. (str.find, not regular expressions, here: this section is
# imported at every cold start of the extension too, and each pattern compiled at import
# costs it ~0.1 ms.)
REFERENCE_KINDS = ("ssm", "secret")
# The query keys a reference may carry: the HTTP API's, less refreshNow (a value read
# once has nothing to refresh), plus jsonKey.
REFERENCE_KEYS = {"ssm": ("withDecryption", "version", "label", "jsonKey"),
                  "secret": ("versionId", "versionStage", "jsonKey")}
# What the wrapper may not find in a name or id, besides white space and control
# characters: it would be a typo in the reference rather than a name (AWS names hold none).
REFERENCE_NAME_REFUSED = "{}"
# How long the wrapper tries to connect while the extension is not listening yet. In
# Lambda it always is (it listens before /register, and Lambda starts the runtime only
# after every extension registered); outside Lambda it may still be starting.
EXTENSION_WAIT_SECONDS = 5.0
CONNECT_RETRY_SECONDS = 0.02
# One connection attempt to the extension on loopback: accepted or refused at once.
CONNECT_SECONDS = 1.0
# How long one answer may take beyond the extension's own budget for it.
ANSWER_MARGIN_SECONDS = 2.0
# At most this many references are fetched at once (one connection each).
REFERENCE_WORKERS = 4


class Reference:
    """One reference as written (text): kind "ssm" or "secret", the name or id, the
    query pairs (jsonKey excluded), the jsonKey or None. fetch_key: what is asked of the
    extension once, however many references ask for it (the AWS call is made once per
    name whatever the jsonKeys: the extension's cache holds the whole value).
    (Not a named tuple: creating one at import costs the extension's cold start ~0.15 ms.)"""

    __slots__ = ("kind", "ident", "query", "json_key", "text")

    def __init__(self, kind, ident, query, json_key, text):
        self.kind, self.ident, self.query, self.json_key, self.text = kind, ident, query, json_key, text

    def __repr__(self):
        return f"Reference({self.text!r})"

    @property
    def fetch_key(self):
        return self.kind, self.ident, self.query, self.json_key


def parse_reference(kind, body, text):
    """The Reference for the body of {{kind:body}} (text: all of it, for messages).
    Raises UnresolvedReference for an empty or odd name and for what the HTTP API refuses
    in a query (unknown or repeated keys, bad values), before anything is fetched."""
    ident, question, query = body.partition("?")
    if not ident:
        raise UnresolvedReference("MalformedReference", "the name is empty")
    if any(c.isspace() or c in REFERENCE_NAME_REFUSED or not c.isprintable() for c in ident):
        raise UnresolvedReference("MalformedReference", "the name holds white space, a brace or a control character")
    try:
        pairs = parse_query(query) if question else []
        values = single_values(pairs, REFERENCE_KEYS[kind])
        sent = [(key, value) for key, value in pairs if key != "jsonKey"]
        read, _, first = ENTRY_KINDS[kind]
        read([(first, ident)] + sent)  # the HTTP API's own checks (name length, version digits...)
    except ClientError as error:
        raise UnresolvedReference(error.error_type, error.message) from None
    json_key = values.get("jsonKey")
    if json_key == "":
        raise UnresolvedReference("InvalidQueryValue", "jsonKey is empty")
    return Reference(kind, ident, tuple(sent), json_key, text)


def find_references(value):
    """[(start, end, Reference)] for the references in one variable's value, in order.
    Raises UnresolvedReference (with .reference, the text at fault) for a malformed one."""
    found = []
    position = 0
    while True:
        start = value.find("{{", position)
        if start < 0:
            return found
        kind = next((kind for kind in REFERENCE_KINDS if value.startswith(kind + ":", start + 2)), None)
        if kind is None:
            position = start + 1  # "{{{ssm:" holds a reference one character on
            continue
        body = start + 3 + len(kind)
        end = value.find("}}", body)
        if end < 0:
            error = UnresolvedReference("MalformedReference", "no closing }}")
            error.reference = value[start:start + 64]
            raise error
        text = value[start:end + 2]
        try:
            found.append((start, end + 2, parse_reference(kind, value[body:end], text)))
        except UnresolvedReference as error:
            error.reference = text
            raise
        position = end + 2


def substitute(value, found, values):
    """value with each reference found (find_references) replaced by values[reference]."""
    for start, end, reference in reversed(found):  # from the end: the earlier places stay where they are
        value = value[:start] + values[reference] + value[end:]
    return value


def reference_target(reference):
    """The HTTP API request for a reference; the extension applies jsonKey itself."""
    _, route, first = ENTRY_KINDS[reference.kind]
    pairs = ((first, reference.ident),) + reference.query
    if reference.json_key is not None:
        pairs += (("jsonKey", reference.json_key),)
    return route + "?" + "&".join(f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in pairs)


def value_from_answer(reference, data):
    """The text of a successful answer: with jsonKey, its Value (a string as it is,
    anything else as JSON text); else Parameter.Value or SecretString. A binary secret is
    refused: an environment variable holds text."""
    try:
        answer = json.loads(data)
        if reference.json_key is not None:
            value = answer["Value"]
            if not isinstance(value, str):
                value = json.dumps(value)
        elif reference.kind == "ssm":
            value = answer["Parameter"]["Value"]
        else:
            value = answer.get("SecretString")
            if value is None and answer.get("SecretBinary") is not None:
                raise UnresolvedReference("BinarySecret", "the secret is binary (SecretBinary); "
                                                          "an environment variable holds text only")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        value = None
    if not isinstance(value, str):
        raise UnresolvedReference("UpstreamInvalidResponse", "the extension's answer has no value")
    return value


def answer_wait(config, kind):
    """How long the extension may take to answer a reference: its own budget for the
    service (or, without one, its longest wait for an AWS call) and a margin."""
    budget_ms = config.ssm_timeout_ms if kind == "ssm" else config.secrets_timeout_ms
    return (budget_ms / 1000.0 if budget_ms else WAIT_WITHOUT_BUDGET) + ANSWER_MARGIN_SECONDS


class LocalClient:
    """The wrapper's client of the running extension on 127.0.0.1:port, a connection of its
    own for each value (a few a cold start, on loopback: nothing to keep alive). clock and
    sleep pace the wait for an extension still starting (injectable for tests); every
    connection and answer is also bounded on the real monotonic clock."""

    def __init__(self, config, clock=time.monotonic, sleep=None):
        self.config, self.clock = config, clock
        # select, not time.sleep: under libfaketime (tests/fake_lambda.py) time.sleep fails.
        self.sleep = sleep or (lambda seconds: select.select([], [], [], seconds))
        self.parts = urlsplit(f"http://127.0.0.1:{config.port}")

    def _connect(self):
        """Connect, retrying a refused connection until EXTENSION_WAIT_SECONDS have passed."""
        deadline = self.clock() + EXTENSION_WAIT_SECONDS
        while True:
            try:
                return open_connection(self.parts, time.monotonic() + CONNECT_SECONDS)
            except ConnectionRefusedError:
                if self.clock() + CONNECT_RETRY_SECONDS >= deadline:
                    raise UnresolvedReference("ExtensionUnreachable",
                                              f"nothing listens on 127.0.0.1:{self.config.port} "
                                              "(PARAMETERS_SECRETS_EXTENSION_HTTP_PORT); is the layer's "
                                              "extension running?") from None
                self.sleep(CONNECT_RETRY_SECONDS)
            except OSError as error:
                raise UnresolvedReference("ExtensionUnreachable",
                                          f"127.0.0.1:{self.config.port}: {type(error).__name__}") from None

    def value(self, reference):
        """The value of a reference, through the extension."""
        headers = [("Host", self.parts.netloc), (TOKEN_HEADER, self.config.request_token)]
        connection = self._connect()
        try:
            status, data, _ = exchange(connection, "GET", reference_target(reference), headers, None,
                                       time.monotonic() + answer_wait(self.config, reference.kind))
        except socket.timeout:
            raise UnresolvedReference("ExtensionTimeout", "the extension did not answer in time") from None
        except HttpProtocolError as error:
            raise UnresolvedReference("UpstreamInvalidResponse", str(error)) from None
        except OSError as error:
            raise UnresolvedReference("ExtensionUnreachable", type(error).__name__) from None
        finally:
            connection.close()
        if status != 200:
            raise aws_error(status, data)
        return value_from_answer(reference, data)


def fetch_references(references, config, workers=REFERENCE_WORKERS):
    """{fetch_key: value or UnresolvedReference} for the distinct fetch keys of references,
    fetched at most `workers` at a time (in threads of run_concurrently's, the file's
    thread rule)."""
    pending = list(dict.fromkeys(reference.fetch_key for reference in references))
    by_key = {reference.fetch_key: reference for reference in references}
    results = {}

    def work():
        client = LocalClient(config)
        while True:
            try:
                key = pending.pop(0)  # list.pop is atomic: no two workers take one key
            except IndexError:
                return
            try:
                results[key] = client.value(by_key[key])
            except UnresolvedReference as error:
                results[key] = error
            except AwsError as error:
                results[key] = UnresolvedReference(error.error_type, error.message)
            except Exception as error:  # a bug: named, never a value
                results[key] = UnresolvedReference("InternalError", type(error).__name__)

    run_concurrently([work] * min(workers, len(pending)), time.monotonic, None)
    return results


def resolve_environment(environ, fetch):
    """{variable: new value} for the variables of environ (a str mapping) that hold
    references; fetch(references) -> {fetch_key: value or UnresolvedReference}. Raises
    UnresolvedReference with .variable and .reference set, for the first failure in the
    order of the variables."""
    found = {}
    for name in sorted(environ):
        value = environ[name]
        if "{{" not in value:
            continue  # the common case, without a regular expression
        try:
            references = find_references(value)
        except UnresolvedReference as error:
            error.variable = name
            raise
        if references:
            found[name] = references
    if not found:
        return {}
    every = [reference for references in found.values() for _, _, reference in references]
    fetched = fetch(every)
    changed = {}
    for name, references in found.items():
        values = {}
        for _, _, reference in references:
            try:
                value = fetched[reference.fetch_key]
                if isinstance(value, UnresolvedReference):
                    raise value
                if "\x00" in value:
                    raise UnresolvedReference("ValueNotText", "the value holds a NUL character, "
                                                              "which an environment variable cannot hold")
                try:
                    # As os.environ would hold the value's UTF-8 bytes, so that one
                    # os.fsencode gives back the text around it and the value exactly.
                    value = os.fsdecode(value.encode("utf-8"))
                except UnicodeEncodeError:
                    raise UnresolvedReference("ValueNotText", "the value is not valid Unicode text") from None
            except UnresolvedReference as error:
                failure = UnresolvedReference(error.error_type, error.message)
                failure.variable, failure.reference = name, reference.text
                raise failure from None
            values[reference] = value
        changed[name] = substitute(environ[name], references, values)
    return changed


def exec_with_values(command, environ, execvpe=os.execvpe):
    """The wrapper's mode: resolve the references in environ, then exec command with the
    resulting environment (a variable without references goes on byte for byte). Returns
    an exit status only when the command could not be started."""
    config, _ = load_config(environ)
    level = "debug" if config.log_level == "debug" else "error"  # a failure is always said
    log = Logger(DEFAULT_NAME, level, config.log_format)
    if not command:
        log.error("--exec-with-values needs the command to run (Lambda gives it to the wrapper)")
        return 2

    def fetch(references):
        if not config.request_token:
            error = UnresolvedReference("NoToken", "no request token: AWS_SESSION_TOKEN is not set (Lambda sets it)")
            return {reference.fetch_key: error for reference in references}
        return fetch_references(references, config)

    try:
        changed = resolve_environment(environ, fetch)
    except UnresolvedReference as error:
        message = f": {shown(error.message, 300)}" if error.message else ""
        log.error(f"environment variable {shown(error.variable, 100)}: {shown(error.reference, 200)}: "
                  f"{error.error_type}{message}; the runtime is not started")
        return 1
    log.debug(f"{len(changed)} environment variable(s) resolved; starting {shown(command[0])}")
    # Encoded as os.environ decoded them (the file system encoding with surrogateescape),
    # so every variable not changed reaches the runtime with its exact bytes.
    env = {os.fsencode(name): os.fsencode(changed.get(name, value)) for name, value in environ.items()}
    try:
        execvpe(command[0], command, env)
    except OSError as error:
        log.error(f"cannot start {shown(command[0])}: {error.strerror or type(error).__name__}")
        return 127
    return 0  # only an injected execvpe returns


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def _raise_stop(signum, frame):
    # Once stopping, further signals are ignored: a second SIGTERM must not interrupt
    # the orderly stop that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def start_up(config, log, early):
    """Everything that can fail before serving: returns (service, listener) or raises
    Fatal with the Lambda error type that names the cause."""
    if early.bind_problem is not None:
        raise Fatal(*early.bind_problem)
    if not config.request_token:
        raise Fatal("Extension.NoToken", "no request token: AWS_SESSION_TOKEN is not set (Lambda sets it); "
                                         "for local runs set AWS_TOKEN to the token callers will send")
    if not config.region:
        raise Fatal("Extension.NoRegion", "no region: looked for AWS_REGION and AWS_DEFAULT_REGION")
    if config.endpoint_error:
        raise Fatal("Extension.ConfigInvalid", config.endpoint_error)
    credentials = CredentialProvider(config, log)
    try:
        credentials.resolve()
    except CredentialsError as error:
        raise Fatal("Extension.NoCredentials", str(error)) from error
    service = Service(config, log, credentials)
    return service, Listener(service, early.sockets)


def report_summary(service, name, config, log):
    counts = service.stats.snapshot()
    log.info("summary: " + " ".join(f"{key}={counts[key]}" for key in Stats.NAMES) + f" version={__version__}")
    if config.metrics == "emf":
        record = {"_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [{
            "Namespace": "ParametersSecretsExtension", "Dimensions": [["ExtensionName"]],
            "Metrics": [{"Name": metric, "Unit": "Count"} for metric in Stats.METRICS.values()]}]},
            "ExtensionName": name, "ExtensionVersion": __version__}  # a property: no dimension
        record.update({Stats.METRICS[key]: counts[key] for key in Stats.NAMES})
        # Printed as is (not through the logger): CloudWatch recognises an EMF record
        # only when the line is the JSON object itself.
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def finish(service, listener, name, config, log, grace):
    """The orderly stop: no refresh ahead starts any more, requests in flight get grace
    seconds, then the summary."""
    service.store.stopped = True
    listener.stop(grace)
    report_summary(service, name, config, log)


def run_in_lambda(api, early, config, log, service, listener, fatal):
    try:
        info = api.registered(early)
        log.debug(f"registered for function {shown(str(info.get('functionName')))}")
        if fatal is not None:
            log.error(f"version {__version__}: {fatal}")  # no "listening" line names it
            api.report_error("init", fatal.error_type, str(fatal))
            return 2
        snapshot = config.initialization_type == "snap-start"
        restores_in_init = service.restores.count
        while True:
            event = api.next_event()
            if snapshot:
                # The first event after a SnapStart INIT comes in a restored copy of this
                # process, maybe months later: nothing cached then is to be trusted, unless
                # a request of the function's saw the clocks jump and dropped it already.
                snapshot = False
                if service.restores.count == restores_in_init:
                    service.restores.seen()
            else:
                service.restores.check()
            if str(event.get("eventType", "")).upper() == "SHUTDOWN":
                break
        # A second at most, and a margin before Lambda's SIGKILL for the summary and the exit.
        deadline_ms = event.get("deadlineMs")
        grace = max(0.0, min(1.0, deadline_ms / 1000.0 - time.time() - 0.3)) if isinstance(
            deadline_ms, (int, float)) else 1.0
        log.info(f"shutdown ({event.get('shutdownReason', 'unknown')}): stopping")
        finish(service, listener, early.name, config, log, grace)
        return 0
    except Stop as stop:
        log.info(f"{stop}: stopping")
        if listener is not None:
            finish(service, listener, early.name, config, log, 0.5)
        return 0
    except ExtensionsApiError as error:
        log.error(str(error))
        return 1
    except Exception as error:  # a bug: tell Lambda, then end
        log.error(f"fatal: {type(error).__name__}")
        try:
            api.report_error("exit", "Extension.Crash", type(error).__name__)
        except ExtensionsApiError:
            pass
        return 1


# --help: the routes, the variables and the usage of this file's docstring (one text to
# keep right, not two; there is none under python -OO).
DOC = __doc__ or ""
USAGE = ("usage: python3 extension.py [NAME]\n\n" + DOC[DOC.find("Routes"):DOC.find("What it never does")]
         + DOC[DOC.find("Usage:"):])


def main(argv, early=None):
    """Run the extension; early: the EarlyStart made before the imports (made here when
    main is called some other way). Returns the exit status."""
    if len(argv) > 1 and argv[1] == "--exec-with-values":
        return exec_with_values(argv[2:], os.environ)
    if len(argv) > 1 and argv[1].startswith("-"):
        known = argv[1] in ("-h", "--help", "--version")
        text = f"{DEFAULT_NAME} {__version__}\n" if argv[1] == "--version" else USAGE
        (sys.stdout if known else sys.stderr).write(text)
        return 0 if known else 2
    early = early or EarlyStart(argv, os.environ)
    config, messages = load_config(os.environ)
    log = Logger(early.name, config.log_level, config.log_format)
    for level, message in messages:
        log.log(level, message)
    log.debug(f"configuration: {config}")

    # Signals go to the main thread only: block them before any thread starts (threads
    # inherit the mask), unblock here once they exist. Otherwise the kernel may deliver
    # SIGTERM to a worker and the main thread sleeps on (docs/pitfalls.md).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)

    try:
        api = ExtensionsApi(config.lambda_runtime_api) if config.lambda_runtime_api else None
    except ValueError as error:  # Lambda cannot be told: it is how Lambda is reached
        log.error(str(error))
        return 2
    service = listener = fatal = None
    try:
        service, listener = start_up(config, log, early)
        if config.prefetch:  # its thread starts while signals are still blocked, like every thread
            service.prefetch(config.prefetch)  # its keys claimed before serving: no request races it
        listener.start()  # serving what waited in the backlog since the early start
    except Fatal as error:
        fatal = error

    try:
        # A SIGTERM that came during start-up is delivered right here, inside the try.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        if api is not None:
            return run_in_lambda(api, early, config, log, service, listener, fatal)
        if fatal is not None:
            log.error(f"version {__version__}: {fatal}")  # no "listening" line names it
            return 2
        while True:
            time.sleep(3600)  # the signal handler raises Stop here
    except Stop as stop:
        log.info(f"{stop}: stopping")
    if listener is not None:
        finish(service, listener, early.name, config, log, 5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv, EARLY))
