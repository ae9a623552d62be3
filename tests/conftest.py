"""Shared fixtures and helpers of the test suite: every test file imports from here.

Every black-box test starts the real ``extension.py`` as a subprocess and points it
at a local AWS emulator on 127.0.0.1 (a moto ``ThreadedMotoServer``, or the scriptable
fake of ``tests/fake_aws.py``). This module provides the pieces every test file needs,
once:

Import paths
    The repository root and ``tests/`` are put on ``sys.path`` here, so test files just
    ``import extension`` (the module under test), ``from conftest import ...``,
    ``import fake_aws`` / ``import fake_lambda``, whatever pytest's import mode is.

Constants
    ``ROOT``          repository root (``Path``); ``TESTS_DIR`` is ``ROOT / "tests"``
    ``EXTENSION``     ``ROOT / "extension.py"``
    ``SSM_GET``       ``"AmazonSSM.GetParameter"`` (the X-Amz-Target of an SSM read)
    ``SM_GET``        ``"secretsmanager.GetSecretValue"`` (the X-Amz-Target of a secret read)
    ``TOKEN_HEADER``  ``"X-Aws-Parameters-Secrets-Token"`` (the request token header)
    ``CACHE_HEADER``  ``"X-Parameters-Secrets-Cache"`` (hit | miss | stale | bypass)

Plain helpers (``from conftest import ...``)
    ``free_port()``                 a currently free TCP port on 127.0.0.1
    ``wait_for(predicate, ...)``    bounded polling loop (never a fixed long sleep)
    ``FakeClock``, ``RecordingLog`` an injectable clock and a stand-in logger, for unit tests
    ``unit_service(env, **clients)``  an in-process extension.Service on fake clocks
    ``stand_in(obj, name, value)``  replace an existing attribute, for fault injection
    ``ssm_path(name, **query)``     ``/systemsmanager/parameters/get?name=<name quoted>&k=v``
    ``sm_path(secret_id, **query)`` ``/secretsmanager/get?secretId=<id quoted>&k=v``
    ``warn_lines(text)``            the WARN lines of a text-format extension log
    ``printed_table(text, heading)`` the rows of a table a benchmark printed
    ``boto3_client(service, url)``  a boto3 client for seeding moto (us-east-1, dummy keys)
    ``moto_reset(url)`` / ``moto_set_auth(url, enabled)``  moto's control API
    ``Headers(pairs)``              response headers: a dict with case-insensitive lookup
    ``CountingProxy(target_url)``   a counting, byte-faithful HTTP forwarder
    ``Extension``                   a handle on a running extension subprocess
    ``ExtensionLauncher``           the factory behind the ``start_extension*`` fixtures

Fixtures
    ``moto_server`` (session)   base URL of one moto server shared by the session
    ``moto`` (function)         same URL, moto state wiped and auth switched off first
    ``ssm``, ``secretsmanager`` boto3 clients bound to ``moto`` (for seeding)
    ``fake`` (function)         a fresh ``fake_aws.FakeAWS`` (scriptable faults, call counts)
    ``fake_module`` (module)    one ``FakeAWS`` shared by a test module
    ``counting_proxy``          factory ``counting_proxy(target_url) -> CountingProxy``
    ``start_extension``         factory ``start_extension(endpoint_url, env=None,
                                name=None, args=(), wait=True) -> Extension``
    ``start_extension_raw``     same factory with ``wait=False`` (start-up is expected to
                                fail: returns once the process has exited)
    ``start_extension_module``  the ``start_extension`` factory with module scope
    ``layer_zip`` (module)      the layer zip, built once per module (``build_layer()``)
    ``lambda_factory``          factory ``lambda_factory(env, task_files, layer=None,
                                **kwargs) -> fake_lambda.LambdaEnvironment``
"""

import http.client
import http.server
import json
import os
import re
import secrets as _secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
EXTENSION = ROOT / "extension.py"

for _directory in (TESTS_DIR, ROOT):
    # ``import fake_aws`` / ``from conftest import ...`` (tests/) and ``import extension``
    # (the root), whatever pytest's import mode is.
    if str(_directory) not in sys.path:
        sys.path.insert(0, str(_directory))

SSM_GET = "AmazonSSM.GetParameter"
SM_GET = "secretsmanager.GetSecretValue"
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
CACHE_HEADER = "X-Parameters-Secrets-Cache"
REGION = "us-east-1"
DUMMY_KEY_ID = "testing"
DUMMY_SECRET_KEY = "testing"

# How long the start_extension fixture waits for GET /ping (or for the exit of a
# process expected to fail). Generous because the CI machine has 2 busy cores.
STARTUP_TIMEOUT = 10.0


# --------------------------------------------------------------------------- helpers


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    There is an unavoidable race between closing the probe socket and the extension
    binding the port; ``start_extension`` retries with a fresh port when the
    extension reports the port as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    """A clock to inject where the extension takes one (clock=, wall=): it says .now,
    and advance(seconds) moves it, so that no unit test sleeps."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class RecordingLog:
    """Stands in for extension.Logger in unit tests: every level enabled, each line kept
    in .lines as (level, message)."""

    def __init__(self):
        self.lines = []

    def log(self, level, message):
        self.lines.append((level, message))

    def enabled(self, level):
        return True

    def debug(self, message):
        self.log("debug", message)

    def info(self, message):
        self.log("info", message)

    def warn(self, message):
        self.log("warn", message)

    def error(self, message):
        self.log("error", message)


def stand_in(obj, name, replacement):
    """Put replacement in place of obj.name, for fault injection in unit tests. The name
    must exist: a renamed internal fails the test at once instead of leaving the real
    one in place unnoticed."""
    getattr(obj, name)
    setattr(obj, name, replacement)
    return replacement


# The request token of in-process services (unit_service).
UNIT_TOKEN = "token-0123456789-abcdefghij-0123456789"


def unit_service(env=None, **clients):
    """An extension.Service for in-process tests, on fake clocks: credentials from the
    environment, endpoints on 127.0.0.1:9 (reached only if a test lets a real client
    call), request token UNIT_TOKEN. clients: aws_service=stand-in (with call(target,
    payload, deadline, render) and close_idle()) replacing that ServiceClient.
    Returns (service, clock, wall, log)."""
    import extension

    config, _ = extension.load_config(dict({
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "AWS_TOKEN": UNIT_TOKEN}, **(env or {})))
    log = RecordingLog()
    credentials = extension.CredentialProvider(config, log)
    credentials.resolve()
    clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
    service = extension.Service(config, log, credentials, clock=clock, wall=wall)
    service.clients.update(clients)
    return service, clock, wall, log


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll ``predicate()`` until it returns a truthy value; return that value.

    Bounded in time (``timeout`` seconds); raises ``AssertionError`` naming
    ``message`` when it never becomes true. Use this instead of a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def ssm_path(name, **query):
    """The parameter route for ``name`` (percent-encoded, ``/`` included), plus ``query``
    appended as given (``ssm_path("/a", version=2)``)."""
    parts = ["name=" + urllib.parse.quote(name, safe="")]
    parts += [f"{key}={value}" for key, value in query.items()]
    return "/systemsmanager/parameters/get?" + "&".join(parts)


def sm_path(secret_id, **query):
    """The secret route for ``secret_id`` (percent-encoded), plus ``query`` as given."""
    parts = ["secretId=" + urllib.parse.quote(secret_id, safe="")]
    parts += [f"{key}={value}" for key, value in query.items()]
    return "/secretsmanager/get?" + "&".join(parts)


# A line of the extension's text log format: "[<name>] <LEVEL> <message>".
_WARN_LINE = re.compile(r"^\[[^\]]+\] WARN ")


def warn_lines(text):
    """The WARN lines of ``text``, a text-format extension log (``ext.stderr()``,
    ``ext.logs()``): lines that merely quote the word WARN do not count."""
    return [line for line in text.splitlines() if _WARN_LINE.match(line)]


def printed_table(text, first_heading):
    """{first cell: [the other cells]} of the rows of a table a benchmark printed: the
    header line starts with first_heading, a rule line follows, the rows end at an empty
    line, and cells are two or more spaces apart."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(first_heading))
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


_BOTO3 = {}
_BOTO3_LOCK = threading.Lock()


def boto3_client(service, url):
    """A boto3 client for ``service`` talking to the emulator at ``url``.

    Region us-east-1 and the dummy keys ``testing``/``testing``; no retries so that
    a seeding mistake fails fast. Only for seeding / inspecting the emulator: the
    code under test never uses boto3. Clients are cached per (service, url) because
    creating one costs ~0.1 s on a busy machine; do not mutate them.
    """
    with _BOTO3_LOCK:
        key = (service, url)
        if key not in _BOTO3:
            import boto3
            from botocore.config import Config

            if "session" not in _BOTO3:
                _BOTO3["session"] = boto3.session.Session(
                    aws_access_key_id=DUMMY_KEY_ID,
                    aws_secret_access_key=DUMMY_SECRET_KEY,
                    region_name=REGION,
                )
            _BOTO3[key] = _BOTO3["session"].client(
                service,
                endpoint_url=url,
                config=Config(retries={"max_attempts": 1}),
            )
        return _BOTO3[key]


def _moto_post(url, path, body=b"", content_type="application/json"):
    req = urllib.request.Request(
        url + path, data=body, method="POST", headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def moto_reset(url):
    """Wipe every moto backend (parameters, secrets, IAM users...)."""
    return _moto_post(url, "/moto-api/reset")


def moto_set_auth(url, enabled):
    """Switch moto's IAM/SigV4 verification on (``True``) or off (``False``).

    moto verifies signatures only after ``POST /moto-api/reset-auth`` with body ``0``
    (``inf`` switches it off again); users, keys and policies must exist before it is
    switched on. The setting is global to the (in-process) moto server, so the
    ``moto`` fixture switches it off before every test.
    """
    body = b"0" if enabled else b"inf"
    return _moto_post(url, "/moto-api/reset-auth", body, content_type="text/plain")


class Headers(dict):
    """Response headers as a dict with case-insensitive lookup (keys stored lower-case).

    A repeated header keeps its values joined with ``", "``.
    """

    def __init__(self, pairs=()):
        super().__init__()
        for name, value in pairs:
            key = name.lower()
            if key in self:
                value = dict.__getitem__(self, key) + ", " + value
            dict.__setitem__(self, key, value)

    def __getitem__(self, key):
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key):
        return dict.__contains__(self, key.lower())

    def get(self, key, default=None):
        return dict.get(self, key.lower(), default)


# ---------------------------------------------------------------- counting proxy

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


class CountingProxy:
    """An HTTP forwarder on 127.0.0.1:<random port> that counts the calls reaching AWS.

    Point the extension's ``AWS_ENDPOINT_URL`` at ``proxy.url``; each request is
    forwarded byte-faithfully (same method, path, headers *including Host*, body) to
    ``target_url`` and the answer is relayed back. Keeping the Host the extension
    signed matters: moto with auth on verifies the signature over that Host.

    Attributes and methods:
        ``url``                       ``"http://127.0.0.1:<port>"``
        ``calls``                     list of ``(x_amz_target, parsed_json_body)``
                                      (body ``None`` if it was not JSON), in order
        ``requests``                  list of dicts: method, path, headers (list of
                                      pairs, as received), body (bytes)
        ``count(target=None)``        number of calls, optionally only those whose
                                      X-Amz-Target equals ``target``
        ``bodies(target=None)``       the parsed bodies of those calls
        ``reset()``                   forget recorded calls
        ``close()``                   stop serving (the fixture does it at teardown)

    A request that cannot be forwarded (target down) is answered ``502`` and still
    recorded. Thread-safe: the extension may call over several connections at once.
    """

    def __init__(self, target_url, timeout=30.0):
        parsed = urllib.parse.urlsplit(target_url)
        self.target_host = parsed.hostname
        self.target_port = parsed.port or 80
        self.timeout = timeout
        self._lock = threading.Lock()
        self.calls = []
        self.requests = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                pairs = list(self.headers.items())
                target = self.headers.get("X-Amz-Target")
                try:
                    parsed_body = json.loads(body) if body else None
                except ValueError:
                    parsed_body = None
                with proxy._lock:
                    proxy.calls.append((target, parsed_body))
                    proxy.requests.append(
                        {"method": self.command, "path": self.path,
                         "headers": pairs, "body": body}
                    )
                try:
                    conn = http.client.HTTPConnection(
                        proxy.target_host, proxy.target_port, timeout=proxy.timeout
                    )
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in pairs:
                        if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                            continue
                        conn.putheader(name, value)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    status, reason = resp.status, resp.reason
                    resp_headers = resp.getheaders()
                    resp_body = resp.read()
                    conn.close()
                except OSError as exc:
                    status, reason = 502, "Bad Gateway"
                    resp_body = json.dumps(
                        {"__type": "ProxyError", "message": str(exc)}
                    ).encode()
                    resp_headers = [("Content-Type", "application/json")]
                self.send_response_only(status, reason)
                for name, value in resp_headers:
                    if name.lower() in _HOP_BY_HOP or name.lower() in (
                        "content-length", "server", "date"
                    ):
                        continue
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(resp_body)))
                self.end_headers()
                self.wfile.write(resp_body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def count(self, target=None):
        """Number of forwarded calls (only those with X-Amz-Target ``target`` if given)."""
        with self._lock:
            return sum(1 for t, _ in self.calls if target is None or t == target)

    def bodies(self, target=None):
        """Parsed JSON bodies of the recorded calls (optionally one X-Amz-Target only)."""
        with self._lock:
            return [b for t, b in self.calls if target is None or t == target]

    def reset(self):
        """Forget everything recorded so far."""
        with self._lock:
            self.calls.clear()
            self.requests.clear()

    def close(self):
        """Stop the proxy (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# ----------------------------------------------------------------- the extension

_DEFAULT = object()


class Extension:
    """A running (or exited) ``extension.py`` subprocess started by ``start_extension``.

    Attributes: ``port``, ``url`` (``"http://127.0.0.1:<port>"``), ``token`` (the
    request token it expects: the random ``AWS_SESSION_TOKEN`` unless ``env``
    overrode it), ``proc`` (``subprocess.Popen``), ``env`` (the exact environment it
    was started with), ``stdout_path`` / ``stderr_path``.
    """

    def __init__(self, proc, port, token, env, stdout_path, stderr_path, files):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token = token
        self.env = env
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._files = files

    # -- HTTP
    def request(self, method, path, token=_DEFAULT, headers=None, body=None, timeout=10.0):
        """Send one request on a new connection; return ``(status, Headers, body bytes)``.

        ``token`` defaults to the extension's own token; pass ``None`` to send no
        ``X-Aws-Parameters-Secrets-Token`` header, or any string to send that.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            return self.request_on(conn, method, path, token=token, headers=headers, body=body)
        finally:
            conn.close()

    def request_on(self, conn, method, path, token=_DEFAULT, headers=None, body=None):
        """Like ``request`` but on a given (keep-alive) ``http.client`` connection."""
        all_headers = {}
        if token is _DEFAULT:
            token = self.token
        if token is not None:
            all_headers[TOKEN_HEADER] = token
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, Headers(resp.getheaders()), data

    def get(self, path, token=_DEFAULT, headers=None, timeout=10.0):
        """``GET path``; return ``(status, Headers, body bytes)`` (see ``request``)."""
        return self.request("GET", path, token=token, headers=headers, timeout=timeout)

    def get_json(self, path, token=_DEFAULT, headers=None, timeout=10.0):
        """``GET path``; return ``(status, Headers, parsed JSON body)``.

        Fails the test with the raw body if it is not JSON.
        """
        status, hdrs, body = self.get(path, token=token, headers=headers, timeout=timeout)
        try:
            parsed = json.loads(body)
        except ValueError:
            pytest.fail(f"GET {path}: body is not JSON (status {status}): {body[:500]!r}")
        return status, hdrs, parsed

    def connection(self, timeout=10.0):
        """A new ``http.client.HTTPConnection`` to the extension (caller closes it)."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    # -- logs and lifetime
    def stderr(self):
        """Everything written to stderr so far (text)."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self):
        """Everything written to stdout so far (text)."""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def logs(self):
        """stderr followed by stdout, as text, so far."""
        return self.stderr() + self.stdout()

    def alive(self):
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, timeout=10.0, sig=signal.SIGTERM):
        """Send ``sig`` (SIGTERM), wait up to ``timeout`` s, SIGKILL after; return the exit code.

        A process that had to be killed returns a negative code (``-9``), so a test
        asserting ``stop() == 0`` catches a hang on SIGTERM.
        """
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in self._files:
            if not f.closed:
                f.close()
        return self.proc.returncode


def _base_env(home, endpoint_url, port, token):
    """The clean environment an extension starts with (nothing inherited but PATH/LANG)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "AWS_SESSION_TOKEN": token,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
    }
    if endpoint_url is not None:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    return env


def _ping(port):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


class ExtensionLauncher:
    """Implementation of the ``start_extension`` factory fixtures (see their docs).

    ``ExtensionLauncher(tmp_path_factory)(endpoint_url, env=None, name=None, args=(),
    wait=True)``; ``stop_all()`` stops every extension it started.
    """

    def __init__(self, tmp_path_factory):
        self._tmp_factory = tmp_path_factory
        self.started = []

    def __call__(self, endpoint_url, env=None, name=None, args=(), wait=True,
                 timeout=STARTUP_TIMEOUT, python=None):
        env = dict(env or {})
        port_fixed = "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT" in env
        attempts = 1 if port_fixed else 3
        for attempt in range(attempts):
            ext = self._launch(endpoint_url, env, name, args, wait, timeout, python)
            if (
                not port_fixed
                and wait is True
                and ext.proc.poll() is not None
                and "in use" in ext.stderr().lower()
                and attempt + 1 < attempts
            ):
                continue  # lost the free_port() race: try another port
            break
        if wait is True and ext.proc.poll() is not None:
            pytest.fail(
                f"extension exited with code {ext.proc.returncode} before answering /ping;"
                f"\n--- stderr ---\n{ext.stderr()}\n--- stdout ---\n{ext.stdout()}"
            )
        return ext

    def _launch(self, endpoint_url, overrides, name, args, wait, timeout, python=None):
        tmp = self._tmp_factory.mktemp("ext")
        home = tmp / "home"
        home.mkdir()
        port = free_port()
        token = _secrets.token_urlsafe(24)
        env = _base_env(home, endpoint_url, port, token)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        try:
            port = int(env.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "2773"))
        except ValueError:
            port = 2773  # an invalid value on purpose: the extension falls back to its default
        # The token the extension expects: AWS_TOKEN, then AWS_SESSION_TOKEN, then
        # AWS_CONTAINER_AUTHORIZATION_TOKEN (README.md).
        expected = next(
            (env[k] for k in ("AWS_TOKEN", "AWS_SESSION_TOKEN",
                              "AWS_CONTAINER_AUTHORIZATION_TOKEN") if env.get(k)),
            None,
        )
        stdout_path, stderr_path = tmp / "stdout.txt", tmp / "stderr.txt"
        out = open(stdout_path, "wb")
        err = open(stderr_path, "wb")
        cmd = [python or sys.executable, str(EXTENSION)]
        if name is not None:
            cmd.append(name)
        cmd.extend(args)
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(tmp)
        )
        ext = Extension(proc, port, expected, env, stdout_path, stderr_path, (out, err))
        self.started.append(ext)
        if wait is True:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not _ping(port):
                if time.monotonic() >= deadline:
                    ext.stop()
                    pytest.fail(
                        f"extension did not answer GET /ping on port {port} within "
                        f"{timeout} s\n--- stderr ---\n{ext.stderr()}\n--- stdout ---\n"
                        f"{ext.stdout()}"
                    )
                time.sleep(0.02)
        elif wait is False:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                ext.stop()
                pytest.fail(
                    f"extension was expected to exit but still ran after {timeout} s"
                    f"\n--- stderr ---\n{ext.stderr()}"
                )
        return ext

    def stop_all(self):
        """SIGTERM every extension started here at once, then reap each (SIGKILL after 5 s)."""
        for ext in self.started:
            if ext.proc.poll() is None:
                try:
                    ext.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for ext in self.started:
            ext.stop(timeout=5)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_server():
    """One moto ``ThreadedMotoServer`` on 127.0.0.1:<random port> for the session.

    Yields its base URL ``"http://127.0.0.1:<port>"``. Tests normally use ``moto``,
    which also wipes its state first.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_server):
    """The session's moto URL with every backend reset and signature checks off."""
    moto_set_auth(moto_server, False)
    moto_reset(moto_server)
    yield moto_server


@pytest.fixture
def ssm(moto):
    """A boto3 SSM client bound to the freshly reset ``moto`` (for seeding)."""
    return boto3_client("ssm", moto)


@pytest.fixture
def secretsmanager(moto):
    """A boto3 Secrets Manager client bound to the freshly reset ``moto`` (for seeding)."""
    return boto3_client("secretsmanager", moto)


@pytest.fixture
def fake():
    """A fresh ``fake_aws.FakeAWS`` on 127.0.0.1 for one test (closed at teardown).

    Scriptable per call (``fake.script("500", "ok")``, ``fake.set_default(...)``), values
    set with ``set_value`` / ``set_secret``, calls counted with ``fake.calls(...)``;
    point the extension at ``fake.url``.
    """
    from fake_aws import FakeAWS  # imported here: only tests that use the fake need it

    with FakeAWS() as aws:
        yield aws


@pytest.fixture(scope="module")
def fake_module():
    """One ``fake_aws.FakeAWS`` shared by a whole test module (with
    ``start_extension_module``); tests sharing it use names of their own, since the fake
    scripts and counts per name."""
    from fake_aws import FakeAWS

    with FakeAWS() as aws:
        yield aws


@pytest.fixture
def counting_proxy():
    """Factory: ``counting_proxy(target_url) -> CountingProxy``; all closed at teardown."""
    proxies = []

    def make(target_url):
        proxy = CountingProxy(target_url)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def start_extension(tmp_path_factory):
    """Factory that starts the real ``extension.py`` and returns an ``Extension``.

    ``start_extension(endpoint_url, env=None, name=None, args=(), wait=True)``:

    - picks a free loopback port (``PARAMETERS_SECRETS_EXTENSION_HTTP_PORT``);
    - builds a CLEAN environment (nothing of the developer's ``AWS_*`` leaks in):
      PATH, LANG, HOME (an empty tmp dir), AWS_SESSION_TOKEN (random; also the
      request token), AWS_REGION=us-east-1, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
      = ``testing``, AWS_ENDPOINT_URL=endpoint_url (omitted if ``None``),
      PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL=debug;
    - applies ``env`` overrides (a value ``None`` removes the variable);
    - runs ``[sys.executable, EXTENSION, name?, *args]`` with stdout/stderr going to
      files (``Extension.logs()``), cwd a tmp dir;
    - ``wait=True``: waits (bounded, ~10 s) until ``GET /ping`` answers 200 and fails
      the test with the captured stderr if the process exits or times out;
      ``wait=False``: expects start-up to FAIL, returns once the process exited
      (check ``ext.proc.returncode`` and ``ext.stderr()``);
      ``wait=None``: returns at once (e.g. Lambda-mode tests that drive a fake API).

    Every extension started is stopped at teardown.
    """
    launcher = ExtensionLauncher(tmp_path_factory)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def start_extension_module(tmp_path_factory):
    """``start_extension`` with module scope: for an extension shared by a whole test
    module (its state, e.g. the cache, then carries over from test to test)."""
    launcher = ExtensionLauncher(tmp_path_factory)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def start_extension_raw(start_extension):
    """``start_extension`` for start-ups expected to fail: waits for the exit, not /ping."""

    def start(endpoint_url, env=None, name=None, args=(), timeout=STARTUP_TIMEOUT):
        return start_extension(endpoint_url, env=env, name=name, args=args,
                               wait=False, timeout=timeout)

    return start


# ------------------------------------------------------------------ the layer in a fake Lambda


def build_layer(out_dir, name=None):
    """Run build_layer.sh into out_dir (NAME: another extension name); the zip's path."""
    cmd = ["sh", str(ROOT / "build_layer.sh"), "-o", str(out_dir)]
    if name:
        cmd.append(name)
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("EXTENSION_NAME", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layer_zip(tmp_path_factory):
    """The layer as build_layer.sh makes it, built once per test module."""
    return build_layer(tmp_path_factory.mktemp("layer"))


@pytest.fixture
def lambda_factory(tmp_path, layer_zip):
    """Factory ``lambda_factory(env, task_files, layer=None, **kwargs)`` ->
    fake_lambda.LambdaEnvironment running the layer (default: ``layer_zip``) with the
    function's files task_files ({name: source}); each is closed at teardown and its
    processes' output printed (pytest shows it for a failed test)."""
    from fake_lambda import LambdaEnvironment

    made = []

    def make(env, task_files, layer=None, **kwargs):
        lam = LambdaEnvironment(layer or layer_zip, tmp_path / f"lambda{len(made)}", env, task_files, **kwargs)
        made.append(lam)
        return lam

    yield make
    for lam in made:
        lam.close()
        print(lam.logs())
