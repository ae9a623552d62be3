"""Lambda's real life: freezes, SnapStart restores, wall-clock jumps, prompt shutdown.

Facts (docs/pitfalls.md, "Lambda's real life"; docs/design.md):

* Between events Lambda freezes every process of the environment, for seconds or hours,
  and the monotonic clock runs on. A function that keeps an ``http.client`` connection
  at module level and never retries must still get its answers: the extension keeps
  idle connections with no timer (test_keepalive.py pins the HTTP side; here the fake
  Lambda freezes the processes for real with SIGSTOP/SIGCONT).
* SnapStart: after an INIT with ``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`` the memory
  of every process is snapshotted and restored, maybe days later; the restored
  monotonic clock does not count the time in between, the wall clock is right. So a
  cache entry is fresh only while both ``time.monotonic()`` and ``time.time()`` are
  before its expiry; a wall-clock jump of more than 10 s beyond the monotonic clock is
  a restore: every cached value, the cached credentials and the idle AWS connections
  are dropped and fetched again on demand, with one INFO line
  ``snapshot restore detected: cache and credentials dropped``; with ``snap-start`` the
  first INVOKE after INIT does the same even without a jump.
* Shutdown with nothing in flight is prompt (asserted here: < 1 s; the benchmark
  measures the 50 ms target); a request in flight still gets its answer.

The wall clock of the extension is moved with libfaketime (Debian package
``libfaketime``): ``LD_PRELOAD`` with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` and an offset
in ``FAKETIME_TIMESTAMP_FILE`` re-read at every call (``FAKETIME_NO_CACHE=1``). Those
tests skip when the library is not installed. On Python 3.11+ ``time.sleep`` fails with
EINVAL under that setting (libfaketime issue 426); the stand-alone extension gets a
``sitecustomize`` that sleeps with ``select`` (tests/fake_lambda.py's SLEEP_SHIM).
"""

import http.client
import http.server
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import SSM_GET, TOKEN_HEADER, free_port, wait_for
from fake_aws import Do, FakeAWS
from fake_lambda import (
    SLEEP_SHIM,
    faketime_env,
    find_libfaketime,
    write_wall_clock_offset,
)

NAME = "parameters-secrets-extension"
PARAM = "/real-life/param"
PARAM_QUOTED = "%2Freal-life%2Fparam"
VALUE = "value-before-and-after"
PATH = "/systemsmanager/parameters/get?name=" + PARAM_QUOTED
SLOW = "/real-life/slow"
SLOW_PATH = "/systemsmanager/parameters/get?name=%2Freal-life%2Fslow"
RESTORE_LINE = "snapshot restore detected: cache and credentials dropped"
CONTAINER_TOKEN = "container-authorization-token-4f1c"
THREE_DAYS = 3 * 86400


def restore_lines(logs):
    """The INFO lines announcing a detected restore ("[name] INFO message" format)."""
    return [line for line in logs.splitlines() if line.rstrip().endswith("] INFO " + RESTORE_LINE)]


# --------------------------------------------------------------------------- fakes


class CredentialsEndpoint:
    """A container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI), as SnapStart
    functions get theirs: temporary keys valid 30 days, so only a drop makes the
    extension ask again. ``calls`` counts the requests."""

    def __init__(self, token=CONTAINER_TOKEN):
        self.calls = 0
        self.lock = threading.Lock()
        endpoint = self
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 86400))

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with endpoint.lock:
                    endpoint.calls += 1
                ok = self.headers.get("Authorization") == token
                body = json.dumps({"AccessKeyId": "ASIAREALLIFE", "SecretAccessKey": "real-life-secret-key",
                                   "Token": "real-life-session-token", "Expiration": expiration}
                                  if ok else {"message": "denied"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/creds"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def count(self):
        with self.lock:
            return self.calls

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def aws():
    """tests/fake_aws.FakeAWS holding PARAM, which also records the client port of every
    call (``aws.client_ports``): a new port is a new connection from the extension."""
    with FakeAWS() as fake:
        fake.set_value(PARAM, VALUE)
        fake.set_value(SLOW, "slow-value")
        fake.client_ports = []
        handle = fake._handle

        def record(handler):
            fake.client_ports.append(handler.client_address[1])
            return handle(handler)

        fake._handle = record  # the fake's request handler calls fake._handle(self)
        yield fake


@pytest.fixture
def creds():
    endpoint = CredentialsEndpoint()
    yield endpoint
    endpoint.close()


def container_env(creds):
    """Credentials from the container endpoint and no keys in the environment, as in a
    SnapStart function; the request token is then AWS_CONTAINER_AUTHORIZATION_TOKEN."""
    return {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_TOKEN}


# --------------------------------------------------------------------------- libfaketime


class WallClock:
    """The environment that lets a stand-alone extension's wall clock be moved."""

    def __init__(self, library, directory):
        self.library = library
        self.file = directory / "faketime-offset"
        write_wall_clock_offset(self.file, 0)
        self.site = directory / "faketime-site"
        self.site.mkdir()
        (self.site / "sitecustomize.py").write_text(SLEEP_SHIM)

    def env(self):
        return dict(faketime_env(self.library, self.file), PYTHONPATH=str(self.site))

    def set(self, seconds):
        write_wall_clock_offset(self.file, seconds)


@pytest.fixture(scope="module")
def libfaketime(tmp_path_factory):
    """libfaketime's path, checked to do what these tests rely on; skip if not installed."""
    library = find_libfaketime()
    if library is None:
        pytest.skip("libfaketime is not installed (Debian/Ubuntu: apt-get install -y libfaketime): "
                    "needed to move the extension's wall clock while its monotonic clock stands still")
    clock = WallClock(library, tmp_path_factory.mktemp("faketime-check"))
    clock.set(1000)
    probe = ("import json, time; m = time.monotonic(); time.sleep(0.01); "
             "print(json.dumps([time.time(), m]))")
    env = dict(os.environ, **clock.env())
    before_wall, before_mono = time.time(), time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"a Python under libfaketime failed:\n{done.stderr}"
    wall, mono = json.loads(done.stdout)
    assert 995 < wall - before_wall < 1005, f"libfaketime did not move time.time() by 1000 s: {done.stdout}"
    assert -1 < mono - before_mono < 5, f"libfaketime moved time.monotonic(): {done.stdout}"
    return library


@pytest.fixture
def wall_clock(libfaketime, tmp_path):
    return WallClock(libfaketime, tmp_path)


# --------------------------------------------------------------------------- fake Lambda


@pytest.fixture
def make_lambda(lambda_factory):
    """Factory ``make_lambda(env, handler_source, **kwargs) -> LambdaEnvironment``."""

    def make(env, handler_source, **kwargs):
        return lambda_factory(env, {"handler.py": handler_source}, **kwargs)

    return make


def lambda_env(endpoint_url, home, port, **overrides):
    """The function's environment as Lambda sets it; ``None`` removes a variable."""
    env = {
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "session-token-of-the-real-life-tests",
        "AWS_ENDPOINT_URL": endpoint_url,
        "HOME": str(home),
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
    }
    env.update(overrides)
    return env


# A function that fetches PARAM over one module-level http.client connection, with no
# retry: an error is reported, not hidden. FETCH_AT_INIT: also at import (init code).
HANDLER = string.Template('''
import http.client
import os
import time

PORT = $port
PATH = "$path"
TOKEN = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
CONN = http.client.HTTPConnection("localhost", PORT, timeout=10)


def fetch():
    try:
        CONN.request("GET", PATH, headers={"X-Aws-Parameters-Secrets-Token": TOKEN})
        resp = CONN.getresponse()
        body = resp.read().decode()
        return {"status": resp.status, "cache": resp.getheader("X-Parameters-Secrets-Cache"),
                "body": body, "port": CONN.sock.getsockname()[1] if CONN.sock else None}
    except Exception as exc:  # no retry, on purpose
        CONN.close()
        return {"error": type(exc).__name__ + ": " + str(exc)}


INIT = fetch() if $fetch_at_init else None


def handler(event, context):
    answer = {"init": INIT, "wall": time.time(), "monotonic": time.monotonic(),
              "init_type": os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE")}
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("fetch"):
        answer["fetch"] = fetch()
    return answer
''')


def handler_source(port, fetch_at_init=False, path=PATH):
    return HANDLER.substitute(port=port, path=path, fetch_at_init=bool(fetch_at_init))


def invoke_ok(lam, payload):
    result = lam.invoke(payload)
    assert result.status == "success", f"{result}\n{lam.logs()}"
    return result.payload


def get(port, token, path=PATH, timeout=10):
    """GET from the test process on a new connection: (status, cache header, body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={TOKEN_HEADER: token})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("X-Parameters-Secrets-Cache"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, None, exc.read()


# ===================================================================== the fake itself


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_fake_lambda_freeze_stops_every_process_until_thaw(make_lambda, aws, tmp_path):
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port)
    lam = make_lambda(env, handler_source(port))
    assert lam.start().ok, lam.logs()
    pids = [rec.proc.pid for rec in lam.processes.values()] + [lam.runtime_proc.pid]
    lam.freeze()
    assert [_state(pid) for pid in pids] == ["T"] * len(pids)
    # A frozen extension does not answer (the kernel still accepts the connection)...
    box = {}
    worker = threading.Thread(target=lambda: box.update(answer=get(port, env["AWS_SESSION_TOKEN"])))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and box == {}
    # ...and answers once thawed.
    lam.thaw()
    worker.join(10)
    assert box["answer"][0] == 200, box
    wait_for(lambda: "T" not in [_state(pid) for pid in pids], message="every process to run again")
    assert len(lam.freezes) == 1 and lam.freezes[0] >= 0.3
    assert lam.invoke({}).status == "success"


@pytest.mark.parametrize("init_type", ["on-demand", "snap-start"])
def test_fake_lambda_sets_the_initialization_type(make_lambda, aws, tmp_path, init_type):
    port = free_port()
    lam = make_lambda(lambda_env(aws.url, tmp_path, port), handler_source(port), init_type=init_type)
    assert lam.start().ok, lam.logs()
    assert invoke_ok(lam, {})["init_type"] == init_type
    with open(f"/proc/{lam.processes[NAME].proc.pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert environ[b"AWS_LAMBDA_INITIALIZATION_TYPE"] == init_type.encode()


def test_fake_lambda_moves_the_wall_clock_only(make_lambda, aws, tmp_path, libfaketime):
    port = free_port()
    lam = make_lambda(lambda_env(aws.url, tmp_path, port), handler_source(port), faketime=True)
    assert lam.start().ok, lam.logs()
    lam.set_wall_clock_offset(THREE_DAYS)
    wall, mono = time.time(), time.monotonic()
    answer = invoke_ok(lam, {"sleep": 0.01})  # time.sleep works in the runtime (SLEEP_SHIM)
    assert THREE_DAYS - 5 < answer["wall"] - wall < THREE_DAYS + 5, answer
    assert -1 < answer["monotonic"] - mono < 5, answer
    ext = next(iter(lam.extensions.values()))
    assert ext.delivered[-1]["deadlineMs"] > (wall + THREE_DAYS) * 1000  # on the moved clock


# ===================================================================== wall clock


def test_wall_clock_past_the_ttl_makes_the_next_request_a_miss(start_extension, aws, wall_clock):
    """TTL 5 s; the wall clock moves 7 s, the monotonic clock does not: the entry is
    stale by the wall clock, so the next request goes to AWS. 7 s is no restore (that
    takes more than 10 s), so no restore line either."""
    ext = start_extension(aws.url, env=dict(wall_clock.env(), SSM_PARAMETER_STORE_TTL=5))
    assert get(ext.port, ext.token)[:2] == (200, "miss")
    assert get(ext.port, ext.token)[:2] == (200, "hit")
    assert aws.calls(SSM_GET, name=PARAM) == 1

    wall_clock.set(7)
    status, cache, body = get(ext.port, ext.token)
    assert (status, cache) == (200, "miss"), f"{status} {cache} {body!r}\n{ext.stderr()}"
    assert aws.calls(SSM_GET, name=PARAM) == 2
    assert json.loads(body)["Parameter"]["Value"] == VALUE
    assert get(ext.port, ext.token)[:2] == (200, "hit")  # cached again, by both clocks
    assert aws.calls(SSM_GET, name=PARAM) == 2
    assert restore_lines(ext.stderr()) == []


@pytest.mark.parametrize("jump", [60, THREE_DAYS], ids=["60s", "3days"])
def test_wall_clock_jump_is_a_restore_that_drops_everything(start_extension, aws, creds, wall_clock, jump):
    """A jump of more than 10 s beyond the monotonic clock: cached values (even one the
    TTL of 300 s still covers after 60 s), cached credentials (valid 30 days) and idle
    AWS connections are dropped; all come back on demand; one INFO line."""
    ext = start_extension(aws.url, env=dict(wall_clock.env(), **container_env(creds),
                                            SSM_PARAMETER_STORE_TTL=300))
    assert get(ext.port, ext.token)[:2] == (200, "miss")
    assert get(ext.port, ext.token)[:2] == (200, "hit")
    assert (aws.calls(SSM_GET, name=PARAM), creds.count()) == (1, 1)

    wall_clock.set(jump)
    status, cache, body = get(ext.port, ext.token)
    assert (status, cache) == (200, "miss"), f"{status} {cache} {body!r}\n{ext.stderr()}"
    assert aws.calls(SSM_GET, name=PARAM) == 2
    assert creds.count() == 2, "the cached credentials were not dropped"
    assert aws.client_ports[1] != aws.client_ports[0], "the idle AWS connection was reused"
    assert len(restore_lines(ext.stderr())) == 1, ext.stderr()

    assert get(ext.port, ext.token)[:2] == (200, "hit")
    assert (aws.calls(SSM_GET, name=PARAM), creds.count()) == (2, 2)
    assert len(restore_lines(ext.stderr())) == 1
    assert CONTAINER_TOKEN not in ext.stderr() and "real-life-secret-key" not in ext.stderr()


@pytest.mark.parametrize("init_type,source", [
    ("snap-start", "import"), ("snap-start", "prefetch"), ("on-demand", "import"),
], ids=["snap-start-import", "snap-start-prefetch", "on-demand-import"])
def test_first_invoke_after_snap_start_init_drops_what_init_fetched(
        make_lambda, aws, creds, tmp_path, init_type, source):
    """INIT fetches PARAM (the handler module at import, or PREFETCH); with snap-start the
    first INVOKE drops it (no clock jump needed), with on-demand it is kept.

    The first invocation fetches nothing, so that the extension has handled its INVOKE
    (the fake ends an invocation only once the extension is back in /event/next) before
    the second one asks: a request racing the INVOKE event would prove nothing."""
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port, **container_env(creds))
    if source == "prefetch":
        env["PARAMETERS_SECRETS_EXTENSION_PREFETCH"] = "ssm:" + PARAM
    lam = make_lambda(env, handler_source(port, fetch_at_init=source == "import"), init_type=init_type)
    assert lam.start().ok, lam.logs()
    # Whatever INIT fetched is cached once this returns (a prefetch still in flight is
    # joined, not repeated). Calls are counted by name: prefetch reads with GetParameters.
    assert get(port, CONTAINER_TOKEN)[0] == 200
    assert (aws.calls(name=PARAM), creds.count()) == (1, 1)

    snap = init_type == "snap-start"
    first = invoke_ok(lam, {})
    if source == "import":
        assert (first["init"]["status"], first["init"]["cache"]) == (200, "miss"), first
    assert len(restore_lines(lam.logs(f"ext-{NAME}"))) == (1 if snap else 0), lam.logs()

    second = invoke_ok(lam, {"fetch": True})["fetch"]
    assert (second.get("status"), second.get("cache")) == (200, "miss" if snap else "hit"), second
    assert aws.calls(name=PARAM) == (2 if snap else 1)
    assert creds.count() == (2 if snap else 1)
    if snap:
        assert aws.client_ports[1] != aws.client_ports[0], "the idle AWS connection was reused"

    third = invoke_ok(lam, {"fetch": True})["fetch"]
    assert (third.get("status"), third.get("cache")) == (200, "hit"), third
    assert aws.calls(name=PARAM) == (2 if snap else 1)
    assert len(restore_lines(lam.logs(f"ext-{NAME}"))) == (1 if snap else 0)

    shut = lam.shutdown("spindown")
    assert shut.killed == [] and shut.exits[NAME][0] == 0, lam.logs()
    assert CONTAINER_TOKEN not in lam.logs(f"ext-{NAME}")


@pytest.mark.parametrize("init_type", ["snap-start", "on-demand"])
def test_restore_days_later_through_lambda(make_lambda, aws, creds, tmp_path, libfaketime, init_type):
    """INIT fetches PARAM at import; the environment's wall clock then moves 3 days (a
    SnapStart restore; with on-demand, a clock jump all the same); the first invocation's
    fetch goes to AWS with fresh credentials, and one restore line is logged."""
    port = free_port()
    lam = make_lambda(lambda_env(aws.url, tmp_path, port, **container_env(creds)),
                      handler_source(port, fetch_at_init=True), init_type=init_type, faketime=True)
    assert lam.start().ok, lam.logs()
    assert (aws.calls(SSM_GET, name=PARAM), creds.count()) == (1, 1)

    lam.set_wall_clock_offset(THREE_DAYS)
    answer = invoke_ok(lam, {"fetch": True})
    assert (answer["init"]["status"], answer["init"]["cache"]) == (200, "miss"), answer
    fetched = answer["fetch"]
    assert (fetched.get("status"), fetched.get("cache")) == (200, "miss"), fetched
    assert (aws.calls(SSM_GET, name=PARAM), creds.count()) == (2, 2)
    assert len(restore_lines(lam.logs(f"ext-{NAME}"))) == 1, lam.logs()

    fetched = invoke_ok(lam, {"fetch": True})["fetch"]
    assert (fetched.get("status"), fetched.get("cache")) == (200, "hit"), fetched
    assert (aws.calls(SSM_GET, name=PARAM), creds.count()) == (2, 2)
    assert len(restore_lines(lam.logs(f"ext-{NAME}"))) == 1


# ===================================================================== shutdown


@pytest.mark.parametrize("idle_connection", [False, True], ids=["no-connection", "idle-keep-alive"])
def test_sigterm_with_nothing_in_flight_exits_within_a_second(start_extension, aws, idle_connection):
    ext = start_extension(aws.url)
    conn = None
    if idle_connection:  # an idle keep-alive connection must not hold the exit up
        conn = http.client.HTTPConnection("127.0.0.1", ext.port, timeout=5)
        assert ext.request_on(conn, "GET", PATH)[0] == 200
    try:
        started = time.monotonic()
        ext.proc.send_signal(signal.SIGTERM)
        ext.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        if conn is not None:
            conn.close()
    assert ext.proc.returncode == 0, ext.stderr()
    assert elapsed < 1.0, f"exit took {elapsed:.3f} s after SIGTERM with nothing in flight"


def test_sigterm_lets_the_request_in_flight_finish(start_extension, aws):
    aws.set_default(Do("ok", delay_ms=600), name=SLOW)
    ext = start_extension(aws.url)
    box = {}
    worker = threading.Thread(target=lambda: box.update(answer=get(ext.port, ext.token, SLOW_PATH)))
    worker.start()
    wait_for(lambda: aws.calls(name=SLOW) == 1, message="the slow request to reach AWS")
    ext.proc.send_signal(signal.SIGTERM)
    worker.join(15)
    status, _, body = box["answer"]
    assert status == 200, body
    assert json.loads(body)["Parameter"]["Value"] == "slow-value"
    assert ext.proc.wait(10) == 0, ext.stderr()


def test_lambda_shutdown_with_idle_connections_exits_within_a_second(make_lambda, aws, tmp_path):
    """After SHUTDOWN, with the function's module-level connection and one of the test's
    both idle and nothing in flight, the extension exits 0 within 1 s."""
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port)
    lam = make_lambda(env, handler_source(port))
    assert lam.start().ok, lam.logs()
    assert invoke_ok(lam, {"fetch": True})["fetch"]["status"] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", PATH, headers={TOKEN_HEADER: env["AWS_SESSION_TOKEN"]})
        assert conn.getresponse().read() and conn.sock is not None
        shut = lam.shutdown("spindown")
    finally:
        conn.close()
    rc, exited_at = shut.exits[NAME]
    assert shut.killed == [] and rc == 0, lam.logs()
    assert exited_at - shut.sent_at_ms < 1000, f"exit {exited_at - shut.sent_at_ms} ms after SHUTDOWN"


def test_lambda_shutdown_lets_the_request_in_flight_finish(make_lambda, aws, tmp_path):
    """SHUTDOWN while a request waits 600 ms on AWS and an idle keep-alive connection is
    open: the request gets its 200, then the extension exits 0 before the deadline."""
    aws.set_default(Do("ok", delay_ms=600), name=SLOW)
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port)
    lam = make_lambda(env, handler_source(port))
    assert lam.start().ok, lam.logs()
    assert invoke_ok(lam, {"fetch": True})["fetch"]["status"] == 200  # leaves an idle connection
    box = {}

    def slow():
        box["answer"] = get(port, env["AWS_SESSION_TOKEN"], SLOW_PATH)
        box["at_ms"] = time.time() * 1000

    worker = threading.Thread(target=slow)
    worker.start()
    wait_for(lambda: aws.calls(name=SLOW) == 1, message="the slow request to reach AWS")
    shut = lam.shutdown("spindown")
    worker.join(15)
    status, _, body = box["answer"]
    assert status == 200, f"{body!r}\n{lam.logs()}"
    assert json.loads(body)["Parameter"]["Value"] == "slow-value"
    rc, exited_at = shut.exits[NAME]
    assert shut.killed == [] and rc == 0, lam.logs()
    assert exited_at < shut.deadline_ms
    assert exited_at - box["at_ms"] < 1000, "the exit lagged the last answer by more than 1 s"


# ===================================================================== freezes


# A function keeping one http.client connection and one urllib3 pool (botocore's HTTP
# library) to the extension at module level, neither retrying: urllib3 would otherwise
# hide a dropped connection by reconnecting; its pool counts the connections it made.
FREEZE_HANDLER = string.Template('''
import http.client
import os

try:
    import urllib3
except ImportError:
    urllib3 = None

PORT = $port
PATH = "$path"
HEADERS = {"X-Aws-Parameters-Secrets-Token": os.environ["AWS_SESSION_TOKEN"]}
CONN = http.client.HTTPConnection("localhost", PORT, timeout=10)
POOL = (urllib3.HTTPConnectionPool("localhost", PORT, maxsize=1, block=True, retries=False, timeout=10.0)
        if urllib3 else None)


def with_http_client():
    try:
        CONN.request("GET", PATH, headers=HEADERS)
        resp = CONN.getresponse()
        resp.read()
        return {"status": resp.status, "port": CONN.sock.getsockname()[1]}
    except Exception as exc:  # no retry: RemoteDisconnected is a failure
        CONN.close()
        return {"error": type(exc).__name__ + ": " + str(exc)}


def with_urllib3():
    if POOL is None:
        return None
    try:
        resp = POOL.request("GET", PATH, headers=HEADERS)
        return {"status": resp.status, "connections": POOL.num_connections}
    except Exception as exc:
        return {"error": type(exc).__name__ + ": " + str(exc), "connections": POOL.num_connections}


def handler(event, context):
    return {"http.client": with_http_client(), "urllib3": with_urllib3()}
''')


@pytest.mark.parametrize("invokes", [5, pytest.param(100, marks=pytest.mark.slow)])
def test_module_level_connections_survive_freezes(make_lambda, aws, tmp_path, invokes):
    """READ_TIMEOUT_MILLIS at its minimum (100 ms), every process frozen 200 ms between
    invocations: every request succeeds and each client used one connection throughout."""
    try:
        import urllib3  # noqa: F401  (the runtime runs this same interpreter)
        has_urllib3 = True
    except ImportError:
        has_urllib3 = False
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port, PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS=100)
    lam = make_lambda(env, FREEZE_HANDLER.substitute(port=port, path=PATH), freeze_between_invokes=0.2)
    assert lam.start().ok, lam.logs()
    answers = [lam.invoke({}) for _ in range(invokes)]

    failures = []
    for i, result in enumerate(answers):
        if result.status != "success":
            failures.append((i, result.error_type, result.payload))
            continue
        for client in ("http.client", "urllib3") if has_urllib3 else ("http.client",):
            outcome = result.payload[client]
            if outcome.get("status") != 200:
                failures.append((i, client, outcome))
    assert failures == [], f"{len(failures)} failed requests, first ones: {failures[:5]}"
    ports = {result.payload["http.client"]["port"] for result in answers}
    assert len(ports) == 1, f"http.client reconnected: local ports {sorted(ports)}"
    if has_urllib3:
        assert answers[-1].payload["urllib3"]["connections"] == 1, "urllib3 opened new connections"
    assert len(lam.freezes) >= invokes and min(lam.freezes) >= 0.2, lam.freezes
    assert aws.calls(SSM_GET, name=PARAM) == 1  # the rest were hits
    shut = lam.shutdown("spindown")
    assert shut.killed == [] and shut.exits[NAME][0] == 0, lam.logs()


# ===================================================================== refresh ahead


def test_a_refresh_ahead_cut_by_a_freeze_is_dropped_at_thaw(make_lambda, aws, tmp_path):
    """TTL 10 s, refreshed ahead after 1 s, a budget of 1 s. The second invocation's hit
    starts a refresh, whose answer AWS sends 0.3 s later, while Lambda has frozen the
    environment for 1.5 s. At thaw the refresh is past its deadline: dropped (the entry
    keeps its value, no WARN), and its connection is not reused."""
    port = free_port()
    env = lambda_env(aws.url, tmp_path, port, SSM_PARAMETER_STORE_TTL="10", SSM_PARAMETER_STORE_TIMEOUT_MILLIS="1000",
                     PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD="10")
    lam = make_lambda(env, handler_source(port))
    assert lam.start().ok, lam.logs()
    first = invoke_ok(lam, {"fetch": True})["fetch"]
    assert (first["status"], first["cache"]) == (200, "miss"), first
    aws.set_value(PARAM, "value-of-a-later-refresh")
    aws.script(Do("ok", delay_ms=300), name=PARAM)
    second = invoke_ok(lam, {"sleep": 1.1, "fetch": True})["fetch"]  # a hit 1.1 s old: the refresh begins
    assert (second["status"], second["cache"]) == (200, "hit"), second
    wait_for(lambda: aws.calls(SSM_GET, PARAM) == 2, message="the refresh's call")
    lam.freeze(1.5)  # the invocation is over: Lambda freezes the environment (returns at thaw)
    third = invoke_ok(lam, {"fetch": True})["fetch"]
    assert (third["status"], third["cache"], json.loads(third["body"])["Parameter"]["Value"]) == (200, "hit", VALUE)
    wait_for(lambda: "ended past its deadline or the stop: dropped" in lam.logs(f"ext-{NAME}"),
             message="the refresh dropped")
    assert "ahead of its expiry failed" not in lam.logs(f"ext-{NAME}")
    # The third invocation's hit (the entry still due) refreshed it again: stored this
    # time, over a new connection.
    wait_for(lambda: aws.calls(SSM_GET, PARAM) == 3, message="the second refresh ahead")
    wait_for(lambda: json.loads(invoke_ok(lam, {"fetch": True})["fetch"]["body"])["Parameter"]["Value"]
             == "value-of-a-later-refresh", message="the second refresh's value")
    assert aws.client_ports[2] != aws.client_ports[1], "the connection of the cut refresh was reused"
    shut = lam.shutdown("spindown")
    assert shut.killed == [], lam.logs()
