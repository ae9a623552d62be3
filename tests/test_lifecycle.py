"""The extension as a real Lambda extension: the built layer run by a fake Lambda.

Every test here builds the layer with ``build_layer.sh``, unpacks it into a temporary
"/opt" and lets ``fake_lambda.LambdaEnvironment`` (a stdlib fake of the Runtime API and
the Extensions API) start ``opt/extensions/<name>`` (the bootstrap, which execs
extension.py) exactly as Lambda does, with the extension talking to moto through
AWS_ENDPOINT_URL. The function side is a small runtime that imports a handler built
around AWS's documented client example (below, verbatim).

Lifecycle facts (docs/design.md, README.md "Design notes"): register under the exact
file name for INVOKE and SHUTDOWN, loop on /event/next, exit 0 before deadlineMs on
SHUTDOWN (any reason, any case), report a failure before the first /event/next with
POST /init/error and a specific Lambda-Extension-Function-Error-Type, then exit
non-zero (2); serve requests already during init (the official extension answers 400
then; ours 200).
"""

import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import SM_GET, SSM_GET, TOKEN_HEADER, build_layer, free_port, wait_for
from fake_lambda import RUNTIME_BASE, LambdaEnvironment

NAME = "parameters-secrets-extension"
PARAM_NAME = "/my/parameter"
PARAM_VALUE = "postgres://db.internal:5432/app"
SECRET_ID = "my-secret"
SECRET_VALUE = '{"username": "app", "password": "s3cr3t-Value!"}'

# AWS's documented way to call the extension, copied VERBATIM from the AWS Lambda
# documentation "Using Parameter Store parameters in AWS Lambda functions" / "Use Secrets
# Manager secrets in Lambda functions" (as quoted in docs/http-api.md). It must work
# unchanged.
DOC_EXAMPLE = """\
import urllib.request
import os
import json

aws_session_token = os.environ.get('AWS_SESSION_TOKEN')

def lambda_handler(event, context):
    # Retrieve /my/parameter from Parameter Store using extension cache
    req = urllib.request.Request('http://localhost:2773/systemsmanager/parameters/get?name=%2Fmy%2Fparameter')
    req.add_header('X-Aws-Parameters-Secrets-Token', aws_session_token)
    config = urllib.request.urlopen(req).read()
    return json.loads(config)
"""

# Appended by the harness: the same pattern for the secret and for the cache header, a
# fetch of both at module level (init code, which runs before the first /event/next of
# the runtime), and a way for a test to hold an invocation open.
HANDLER_TAIL = """

# ---- added by the test harness (tests/test_lifecycle.py) ----
import time
import urllib.error

EXTENSION_PORT = {port}


def fetch(path):
    req = urllib.request.Request('http://localhost:%d%s' % (EXTENSION_PORT, path))
    req.add_header('X-Aws-Parameters-Secrets-Token', aws_session_token)
    try:
        with urllib.request.urlopen(req) as resp:
            return {{'status': resp.status,
                    'cache': resp.headers.get('X-Parameters-Secrets-Cache'),
                    'body': json.loads(resp.read())}}
    except urllib.error.HTTPError as exc:
        return {{'status': exc.code, 'cache': None, 'body': exc.read().decode()}}


PARAM_PATH = '/systemsmanager/parameters/get?name=%2Fmy%2Fparameter'
SECRET_PATH = '/secretsmanager/get?secretId={secret_id}'
INIT = {{'doc_example': lambda_handler(None, None),
        'parameter': fetch(PARAM_PATH),
        'secret': fetch(SECRET_PATH)}} if {fetch_at_init} else None


def handler(event, context):
    release = (event or {{}}).get('wait_for_file')
    if release:
        deadline = time.time() + 20
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.01)
    return {{'init': INIT,
            'doc_example': lambda_handler(event, context),
            'parameter': fetch(PARAM_PATH),
            'secret': fetch(SECRET_PATH),
            'request_id': context.aws_request_id}}
"""


def handler_source(port=2773, fetch_at_init=True):
    """The handler module: DOC_EXAMPLE (port adjusted only when not 2773) + HANDLER_TAIL."""
    doc = DOC_EXAMPLE
    if port != 2773:
        doc = doc.replace("localhost:2773", f"localhost:{port}")
    return doc + HANDLER_TAIL.format(port=port, secret_id=SECRET_ID,
                                     fetch_at_init=bool(fetch_at_init))


@pytest.fixture
def seeded(ssm, secretsmanager):
    ssm.put_parameter(Name=PARAM_NAME, Value=PARAM_VALUE, Type="String")
    secretsmanager.create_secret(Name=SECRET_ID, SecretString=SECRET_VALUE)


def lambda_env(endpoint_url, home, port=None, **overrides):
    """The function's environment as Lambda sets it (temporary credentials + token)."""
    env = {
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": secrets.token_urlsafe(32),
        "AWS_ENDPOINT_URL": endpoint_url,
        "HOME": str(home),
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
    }
    if port is not None:
        env["PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"] = str(port)
    env.update(overrides)
    return env


@pytest.fixture
def make_lambda(lambda_factory):
    """Factory ``make_lambda(env, task_files=None, layer=None, **kwargs)``: the layer in the
    fake Lambda, with the documented handler (for env's port) unless task_files is given.

    On a failing test the output of every process is printed (pytest shows it).
    """

    def make(env, task_files=None, layer=None, **kwargs):
        port = int(env.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", 2773))
        return lambda_factory(env, task_files or {"handler.py": handler_source(port)}, layer, **kwargs)

    return make


def wait_port_free(port, timeout=10.0):
    """The happy path uses the documented default port 2773; wait if something holds it."""
    def free():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
                return True
            except OSError:
                return False
    try:
        wait_for(free, timeout=timeout, interval=0.1, message=f"port {port} to be free")
    except AssertionError:
        pytest.skip(f"port {port} is held by another process on this machine")


def ext_name_exit(lam, name=NAME, timeout=10.0):
    rec = lam.processes[name]
    wait_for(lambda: rec.exited_at is not None, timeout=timeout,
             message=f"{name} to exit\n{lam.logs()}")
    return rec.returncode


# ------------------------------------------------------------------ happy path


def test_init_and_invocations_use_the_cache(make_lambda, seeded, moto, counting_proxy, tmp_path):
    """Parameter + secret fetched at init and in three invocations; AWS called once each.

    Uses the default port 2773, so the handler contains the documented example byte for
    byte (DOC_EXAMPLE) and no port variable is configured at all.
    """
    wait_port_free(2773)
    proxy = counting_proxy(moto)
    env = lambda_env(proxy.url, tmp_path)
    lam = make_lambda(env)
    assert "localhost:2773" in handler_source(2773) and DOC_EXAMPLE in handler_source(2773)
    init = lam.start()
    assert init.ok, f"{init}\n{lam.init_errors}\n{lam.runtime_init_errors}\n{lam.logs()}"
    # The init gate: the runtime started only after the extension had registered
    # under its own file name, and both were in next before init completed.
    assert [r[0] for r in lam.registrations] == [NAME]
    assert set(lam.registrations[0][1]) == {"INVOKE", "SHUTDOWN"}
    reg_time = min(t for t, what in lam.events_log if what == f"register {NAME}")
    rt_time = min(t for t, what in lam.events_log if what == "runtime start")
    assert reg_time <= rt_time
    # Init completed only once the extension and the runtime both waited in next.
    order = [what for _, what in lam.events_log]
    assert order.index(f"next {NAME}") < order.index("init done")
    assert order.index("runtime next") < order.index("init done")
    after_init = (proxy.count(SSM_GET), proxy.count(SM_GET))
    assert after_init == (1, 1), proxy.calls

    results = []
    for i in range(3):
        res = lam.invoke({"n": i})
        assert res.status == "success", f"{res}\n{lam.logs()}"
        results.append(res.payload)

    first = results[0]
    init_fetch = first["init"]
    # Init code (module level) got real answers: 200, fetched from AWS (miss).
    assert init_fetch["doc_example"]["Parameter"]["Value"] == PARAM_VALUE
    assert init_fetch["doc_example"]["Parameter"]["Name"] == PARAM_NAME
    assert init_fetch["parameter"]["status"] == 200
    assert init_fetch["secret"]["status"] == 200
    assert init_fetch["secret"]["body"]["SecretString"] == SECRET_VALUE
    assert init_fetch["secret"]["body"]["Name"] == SECRET_ID
    for res in results:
        assert res["doc_example"]["Parameter"]["Value"] == PARAM_VALUE
        assert res["parameter"]["status"] == 200 and res["parameter"]["cache"] == "hit"
        assert res["secret"]["status"] == 200 and res["secret"]["cache"] == "hit"
        assert res["secret"]["body"]["SecretString"] == SECRET_VALUE
    assert len({r["request_id"] for r in results}) == 3
    # Every invocation was served from the cache: still one call per service.
    assert (proxy.count(SSM_GET), proxy.count(SM_GET)) == (1, 1), proxy.calls

    # Each INVOKE reached the extension with the documented fields, and it went back to
    # /event/next after each (the fake ends an invocation only then).
    ext = next(iter(lam.extensions.values()))
    invokes = [e for e in ext.delivered if e["eventType"] == "INVOKE"]
    assert len(invokes) == 3
    assert {"deadlineMs", "requestId", "invokedFunctionArn", "tracing"} <= set(invokes[0])
    assert ext.next_calls == 4

    shut = lam.shutdown("spindown")
    assert shut.killed == [] and shut.exits[NAME][0] == 0, f"{shut}\n{lam.logs()}"
    assert lam.crashes == [] and lam.init_errors == [] and lam.exit_errors == []
    # The secret value and the token never reach the extension's log.
    log = lam.logs(f"ext-{NAME}")
    assert SECRET_VALUE not in log and "s3cr3t-Value!" not in log
    assert env["AWS_SESSION_TOKEN"] not in log


def test_requests_sent_while_registering_wait_in_the_backlog_and_are_answered(make_lambda, seeded, moto,
                                                                               tmp_path):
    """The extension registers before it has loaded what serves (docs/design.md, "Cold
    start"): a request sent then, even before /register has returned, waits in the listen
    backlog and is answered once serving begins, never refused.

    The fake sends the requests from a thread it starts inside its /register handler,
    before it answers: they reach the extension before its first /event/next, during init.
    """
    port = free_port()
    env = lambda_env(moto, tmp_path, port=port)
    seen = {}
    threads = []

    def fetch(what, path, headers):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                seen[what] = (resp.status, json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            seen[what] = (exc.code, exc.read())
        except OSError as exc:
            seen[what] = ("unreachable", repr(exc))

    def during_register(name):
        seen["name"] = name
        for what, path, headers in (
            ("ping", "/ping", {}),
            ("parameter", "/systemsmanager/parameters/get?name=%2Fmy%2Fparameter",
             {TOKEN_HEADER: env["AWS_SESSION_TOKEN"]}),
        ):
            thread = threading.Thread(target=fetch, args=(what, path, headers), daemon=True)
            thread.start()
            threads.append(thread)

    lam = make_lambda(env, on_register=during_register)
    init = lam.start()
    assert init.ok, f"{init}\n{lam.logs()}"
    for thread in threads:
        thread.join(15)
    assert seen["name"] == NAME
    assert seen["ping"][0] == 200, seen
    assert seen["parameter"][0] == 200, seen
    assert seen["parameter"][1]["Parameter"]["Value"] == PARAM_VALUE
    assert lam.shutdown("spindown").exits[NAME][0] == 0


@pytest.mark.parametrize("reason", ["spindown", "SandboxTerminated", "TIMEOUT"])
def test_shutdown_exits_zero_before_the_deadline(make_lambda, seeded, moto, tmp_path, reason):
    port = free_port()
    lam = make_lambda(lambda_env(moto, tmp_path, port=port))
    assert lam.start().ok, lam.logs()
    res = lam.invoke({})
    assert res.status == "success", f"{res}\n{lam.logs()}"
    shut = lam.shutdown(reason)
    ext = next(iter(lam.extensions.values()))
    assert ext.delivered[-1] == {"eventType": "SHUTDOWN", "deadlineMs": shut.deadline_ms,
                                 "shutdownReason": reason}
    rc, exited_at = shut.exits[NAME]
    assert shut.killed == [], f"SIGKILLed at the deadline\n{lam.logs()}"
    assert rc == 0, lam.logs()
    assert exited_at < shut.deadline_ms
    assert lam.crashes == []
    # It stopped serving: the port can be listened on again (SO_REUSEADDR only skips the
    # TIME_WAIT of connections the extension closed; a live listener still blocks it).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)


def test_shutdown_lets_an_in_flight_request_finish(make_lambda, tmp_path):
    """SHUTDOWN while a request waits on a slow AWS: it still gets its 200, then exit 0.

    On SHUTDOWN the extension stops accepting, lets in-flight requests finish and exits
    0 well before deadlineMs. Upstream is tests/fake_aws.py, answering after 600 ms; the
    shutdown deadline is 2000 ms away.
    """
    from fake_aws import Do, FakeAWS

    with FakeAWS() as aws:
        aws.set_value("/slow", "slow-value")
        port = free_port()
        env = lambda_env(aws.url, tmp_path, port=port)
        lam = make_lambda(env, task_files={"handler.py": "def handler(e, c):\n    return 1\n"})
        assert lam.start().ok, lam.logs()
        assert lam.invoke({}).status == "success"
        aws.script(Do("ok", delay_ms=600), name="/slow")
        box = {}

        def slow_request():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/systemsmanager/parameters/get?name=%2Fslow",
                headers={TOKEN_HEADER: env["AWS_SESSION_TOKEN"]})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    box["answer"] = (resp.status, json.loads(resp.read()))
            except urllib.error.HTTPError as exc:
                box["answer"] = (exc.code, exc.read())
            except OSError as exc:
                box["answer"] = ("failed", repr(exc))

        worker = threading.Thread(target=slow_request)
        worker.start()
        wait_for(lambda: aws.calls(name="/slow") == 1, message="the slow call to reach AWS")
        shut = lam.shutdown("spindown")
        worker.join(15)
        assert box["answer"][0] == 200, f"{box}\n{lam.logs()}"
        assert box["answer"][1]["Parameter"]["Value"] == "slow-value"
        rc, exited_at = shut.exits[NAME]
        assert shut.killed == [] and rc == 0, lam.logs()
        assert exited_at < shut.deadline_ms


# ------------------------------------------------------------------ init errors


def _run_init_failure(make_lambda, env, expected_type):
    lam = make_lambda(env, task_files={"handler.py": handler_source(
        int(env["PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"]), fetch_at_init=False)})
    init = lam.start()
    rc = ext_name_exit(lam)
    assert not init.ok, lam.logs()
    assert [(n, t) for n, t, _ in lam.init_errors] == [(NAME, expected_type)], (
        f"{lam.init_errors}\n{lam.logs()}")
    assert rc == 2, lam.logs()
    log = lam.logs(f"ext-{NAME}")
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert errors, log
    if env.get("AWS_SESSION_TOKEN"):
        assert env["AWS_SESSION_TOKEN"] not in log
    # The environment failed with the extension's own error type (not a timeout).
    assert init.error_type == expected_type, init
    return lam


def test_port_in_use_is_reported_with_init_error(make_lambda, moto, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        _run_init_failure(make_lambda, lambda_env(moto, tmp_path, port=port),
                          "Extension.PortInUse")


@pytest.mark.parametrize("style", ["absent", "empty"])
def test_no_credentials_is_reported_with_init_error(make_lambda, moto, tmp_path, style):
    # No keys (absent, or empty as the RIE sets them), no container credentials, and a
    # HOME without .aws: nothing to sign with.
    blank = None if style == "absent" else ""
    home = tmp_path / "empty-home"
    home.mkdir()
    env = lambda_env(moto, home, port=free_port(),
                     AWS_ACCESS_KEY_ID=blank, AWS_SECRET_ACCESS_KEY=blank)
    _run_init_failure(make_lambda, env, "Extension.NoCredentials")


def test_no_token_is_reported_with_init_error(make_lambda, moto, tmp_path):
    # The RIE sets AWS_SESSION_TOKEN= (empty) when it has none; the long-term keys are fine.
    env = lambda_env(moto, tmp_path, port=free_port(), AWS_SESSION_TOKEN="")
    _run_init_failure(make_lambda, env, "Extension.NoToken")


# ------------------------------------------------------------------ crash


def test_extension_killed_mid_invoke_is_a_crash(make_lambda, seeded, moto, tmp_path):
    port = free_port()
    lam = make_lambda(lambda_env(moto, tmp_path, port=port))
    assert lam.start().ok, lam.logs()
    release = tmp_path / "release"
    box = {}
    worker = threading.Thread(
        target=lambda: box.update(res=lam.invoke({"wait_for_file": str(release)}, timeout=20)))
    worker.start()
    try:
        ext = next(iter(lam.extensions.values()))
        wait_for(lambda: any(e["eventType"] == "INVOKE" for e in ext.delivered),
                 message="the INVOKE to reach the extension")
        lam.kill_extension(NAME, signal.SIGKILL)
    finally:
        release.write_text("go")
        worker.join(30)
    res = box["res"]
    assert res.status == "error" and res.error_type == "Extension.Crash", res
    assert lam.crashes and lam.crashes[0][0] == NAME and lam.crashes[0][1] == -signal.SIGKILL


def test_fatal_failure_after_init_is_reported_with_exit_error(make_lambda, seeded, moto, tmp_path):
    # After the first /event/next, /init/error is no longer allowed: a fault there (here a
    # broken event from the API) is reported with /exit/error, then the process ends.
    lam = make_lambda(lambda_env(moto, tmp_path, port=free_port()))
    assert lam.start().ok, lam.logs()
    lam.deliver_raw(b"this is not an event")
    assert ext_name_exit(lam) == 1
    assert [(name, error_type) for name, error_type, _ in lam.exit_errors] == \
        [(NAME, "Extension.Crash")], lam.logs()
    assert lam.init_errors == []


# ------------------------------------------------------------------ registration name


def test_registers_under_its_own_file_name(make_lambda, seeded, moto, tmp_path):
    """A layer built under another name registers under that name and initialises.

    The fake takes a name that matches no file in extensions/ for an internal extension
    and refuses its SHUTDOWN subscription, so init would not complete otherwise.
    """
    name = "my-team-secrets"
    zip_path = build_layer(tmp_path / "custom", name)
    port = free_port()
    lam = make_lambda(lambda_env(moto, tmp_path, port=port), layer=zip_path)
    init = lam.start()
    assert init.ok, f"{init}\n{lam.protocol_errors}\n{lam.logs()}"
    assert sorted(lam.processes) == [name]
    assert [r[0] for r in lam.registrations] == [name]
    assert lam.registrations[0][2].get("Lambda-Extension-Name") == name
    assert lam.protocol_errors == []
    res = lam.invoke({})
    assert res.status == "success", f"{res}\n{lam.logs()}"
    assert res.payload["parameter"]["body"]["Parameter"]["Value"] == PARAM_VALUE
    assert lam.shutdown("spindown").exits[name][0] == 0


# ------------------------------------------------------------------ standalone


def _tcp_accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _ping_ok(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_standalone_sigterm_twenty_times(tmp_path, layer_zip, moto):
    """Without AWS_LAMBDA_RUNTIME_API: a server that stops on SIGTERM with exit 0, every time.

    Started through the layer's bootstrap, which must exec Python (the signal then
    reaches the extension itself). docs/pitfalls.md: a SIGTERM delivered to a worker thread
    can leave a main thread blocked forever (about once in 20 cycles), so 20 cycles in
    a row. Even cycles send SIGTERM once GET /ping answers 200; odd cycles as soon as
    the port accepts a TCP connection (what a TCP readiness probe sees), which lands the
    signal at the end of start-up: a server that listens must also stop cleanly.
    """
    from fake_lambda import unpack_layer

    opt = tmp_path / "opt"
    unpack_layer(layer_zip, str(opt))
    home = tmp_path / "home"
    home.mkdir()
    for i in range(20):
        port = free_port()
        env = lambda_env(moto, home, port=port,
                         PATH="/usr/local/bin:/usr/bin:/bin",
                         PARAMETERS_SECRETS_EXTENSION_PYTHON=sys.executable,
                         PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL="info")
        ready = _ping_ok if i % 2 == 0 else _tcp_accepts
        proc = subprocess.Popen([str(opt / "extensions" / NAME)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            def up(proc=proc, ready=ready, port=port):
                assert proc.poll() is None, proc.stdout.read().decode()
                return ready(port)
            wait_for(up, interval=0.002, message=f"cycle {i}: {ready.__name__}")
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"cycle {i}: still running 10 s after SIGTERM")
            out = proc.stdout.read().decode()
            assert rc == 0, f"cycle {i} ({ready.__name__}): exit {rc}\n{out}"
            assert "Traceback" not in out, out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_the_bootstraps_python_variable_is_not_taken_for_a_typo(tmp_path, layer_zip, moto):
    """PARAMETERS_SECRETS_EXTENSION_PYTHON is the layer's own (documented) variable.

    The extension warns about look-alikes of its variables (docs/configuration.md); the
    bootstrap's interpreter override is no misspelling and must not be reported as one.
    """
    from fake_lambda import unpack_layer

    opt = tmp_path / "opt"
    unpack_layer(layer_zip, str(opt))
    port = free_port()
    env = lambda_env(moto, tmp_path, port=port, PATH="/usr/local/bin:/usr/bin:/bin",
                     PARAMETERS_SECRETS_EXTENSION_PYTHON=sys.executable)
    proc = subprocess.Popen([str(opt / "extensions" / NAME)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return proc.poll() is not None
        wait_for(up, message="/ping")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode()
        proc.stdout.close()
    warned = [line for line in out.splitlines()
              if "PARAMETERS_SECRETS_EXTENSION_PYTHON" in line and "WARN" in line]
    assert warned == [], out


# ------------------------------------------------------------------ the fake is honest


def _call(lam, method, path, headers=None, body=None):
    req = urllib.request.Request(f"http://{lam.api}{path}", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_fake_returns_the_documented_403_bodies(tmp_path, layer_zip):
    """The fake's protocol errors, so that a sloppy extension cannot pass by accident.

    Bodies and types as the Extensions API (RIE) sends them.
    """
    lam = LambdaEnvironment(layer_zip, tmp_path / "w", {}, {})
    try:
        base = "/2020-01-01/extension"
        reg = base + "/register"
        events = json.dumps({"events": ["INVOKE", "SHUTDOWN"]}).encode()

        def err(status_body):
            status, _, body = status_body
            return status, body.get("errorType"), body.get("errorMessage")

        assert err(_call(lam, "POST", reg, {}, events))[:2] == (
            403, "Extension.InvalidExtensionName")
        assert err(_call(lam, "POST", reg, {"Lambda-Extension-Name": "x"}, b"{nope"))[:2] == (
            403, "InvalidRequestFormat")
        assert err(_call(lam, "POST", reg, {"Lambda-Extension-Name": "x"},
                         b'{"events": ["INVOKE", "BOGUS"]}'))[:2] == (
            403, "Extension.InvalidEventType")
        # No file is called "not-a-file": an internal extension, which cannot get SHUTDOWN.
        assert err(_call(lam, "POST", reg, {"Lambda-Extension-Name": "not-a-file"}, events)) == (
            403, "Extension.InvalidEventType",
            "SHUTDOWN: ShutdownEventNotSupportedForInternalExtension")
        status, headers, body = _call(lam, "POST", reg, {"Lambda-Extension-Name": "internal"},
                                      b'{"events": ["INVOKE"]}')
        assert status == 200 and body["functionVersion"] == "$LATEST"
        ident = headers["Lambda-Extension-Identifier"]
        assert err(_call(lam, "POST", reg, {"Lambda-Extension-Name": "internal"},
                         b'{"events": ["INVOKE"]}'))[:2] == (403, "Extension.InvalidExtensionState")

        nxt = base + "/event/next"
        assert err(_call(lam, "GET", nxt))[:2] == (403, "Extension.MissingExtensionIdentifier")
        assert err(_call(lam, "GET", nxt, {"Lambda-Extension-Identifier": "abc"}))[:2] == (
            403, "Extension.InvalidExtensionIdentifier")
        assert err(_call(lam, "GET", nxt, {
            "Lambda-Extension-Identifier": "00000000-0000-4000-8000-000000000000"}))[:2] == (
            403, "Extension.UnknownExtensionIdentifier")
        for path in ("/init/error", "/exit/error"):
            assert err(_call(lam, "POST", base + path,
                             {"Lambda-Extension-Identifier": ident}, b"{}"))[:2] == (
                403, "Extension.MissingHeader")
        lam.phase = "init"
        status, _, body = _call(lam, "POST", base + "/init/error", {
            "Lambda-Extension-Identifier": ident,
            "Lambda-Extension-Function-Error-Type": "Extension.Test"},
            b'{"errorMessage": "m", "errorType": "Extension.Test"}')
        assert (status, body) == (202, {"status": "OK"})
        assert lam.init_errors == [("internal", "Extension.Test",
                                    {"errorMessage": "m", "errorType": "Extension.Test"})]
        lam.registration_closed = True
        assert err(_call(lam, "POST", reg, {"Lambda-Extension-Name": "late"},
                         b'{"events": ["INVOKE"]}'))[:2] == (403, "Extension.RegistrationClosed")
        # The Runtime API refuses an answer to an invocation that does not exist.
        status, _, body = _call(lam, "POST", RUNTIME_BASE + "/invocation/nope/response",
                                {}, b"{}")
        assert status == 400 and body["errorType"] == "InvalidRequestID"
    finally:
        lam.close()


WRONG_NAME_EXTENSION = """#!{python}
# Registers under a name that is not its file name (a bug the fake must catch).
import json, os, sys, urllib.request, urllib.error
base = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2020-01-01/extension"
req = urllib.request.Request(base + "/register", method="POST",
    data=json.dumps({{"events": ["INVOKE", "SHUTDOWN"]}}).encode(),
    headers={{"Lambda-Extension-Name": "some-other-name"}})
try:
    urllib.request.urlopen(req)
    print("REGISTERED")
except urllib.error.HTTPError as exc:
    print("REFUSED", exc.code, exc.read().decode(), flush=True)
import time
time.sleep(30)
"""


def test_fake_never_initialises_an_extension_registered_under_another_name(tmp_path):
    """Lambda's behaviour: SHUTDOWN refused for the unknown name, the file never counts."""
    import zipfile

    layer = tmp_path / "wrong.zip"
    with zipfile.ZipFile(layer, "w") as zf:
        info = zipfile.ZipInfo("extensions/wrong-name")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, WRONG_NAME_EXTENSION.format(python=sys.executable))
    lam = LambdaEnvironment(layer, tmp_path / "w", {}, {"handler.py": "def handler(e, c):\n    return 1\n"},
                            init_timeout=1.5)
    try:
        init = lam.start()
        assert not init.ok and init.error_type == "Sandbox.Timedout"
        assert lam.runtime_proc is None  # the init gate never opened
        wait_for(lambda: "REFUSED" in lam.logs("ext-wrong-name"))
        assert "ShutdownEventNotSupportedForInternalExtension" in lam.logs("ext-wrong-name")
        assert ("/2020-01-01/extension/register", "Extension.InvalidEventType") in lam.protocol_errors
    finally:
        lam.close()


def test_extensions_api_refusal_is_logged_and_ends_the_process(make_lambda, moto, tmp_path):
    """A 403 from the Extensions API: logged with its errorType, the process ends non-zero.

    The fake is put into the state where registration is closed, so /register answers
    403 {"errorType": "Extension.RegistrationClosed", ...}.
    """
    lam = make_lambda(lambda_env(moto, tmp_path, port=free_port()),
                      task_files={"handler.py": "def handler(e, c):\n    return 1\n"})
    lam.registration_closed = True
    init = lam.start()
    assert not init.ok
    rc = ext_name_exit(lam)
    assert rc == 1, lam.logs()
    assert ("/2020-01-01/extension/register", "Extension.RegistrationClosed") in lam.protocol_errors
    assert "Extension.RegistrationClosed" in lam.logs(f"ext-{NAME}")


# A scripted extension for checking the fake itself: registers properly under its file
# name, then behaves as argv[1] says.
SCRIPTED_EXTENSION = """#!{python}
import json, os, sys, time, urllib.request
mode = "{mode}"
name = os.path.basename(sys.argv[0])
base = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2020-01-01/extension"
req = urllib.request.Request(base + "/register", method="POST",
    data=json.dumps({{"events": ["INVOKE", "SHUTDOWN"]}}).encode(),
    headers={{"Lambda-Extension-Name": name}})
with urllib.request.urlopen(req) as resp:
    ident = resp.headers["Lambda-Extension-Identifier"]
while True:
    req = urllib.request.Request(base + "/event/next",
                                 headers={{"Lambda-Extension-Identifier": ident}})
    with urllib.request.urlopen(req) as resp:
        event = json.loads(resp.read())
    print("EVENT", event["eventType"], flush=True)
    if mode == "exit0-on-invoke" and event["eventType"] == "INVOKE":
        sys.exit(0)
    if mode == "ignore-shutdown" and event["eventType"] == "SHUTDOWN":
        time.sleep(60)
"""


def scripted_layer(tmp_path, mode, name="scripted"):
    import zipfile

    layer = tmp_path / f"{mode}.zip"
    with zipfile.ZipFile(layer, "w") as zf:
        info = zipfile.ZipInfo(f"extensions/{name}")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, SCRIPTED_EXTENSION.format(python=sys.executable, mode=mode))
    return layer


PLAIN_HANDLER = {"handler.py": "def handler(event, context):\n    return {'ok': True}\n"}


def test_fake_kills_an_extension_that_ignores_shutdown(tmp_path):
    lam = LambdaEnvironment(scripted_layer(tmp_path, "ignore-shutdown"), tmp_path / "w", {},
                            PLAIN_HANDLER, shutdown_ms=800)
    try:
        assert lam.start().ok, lam.logs()
        assert lam.invoke({}).payload == {"ok": True}
        shut = lam.shutdown("spindown")
        assert shut.killed == ["scripted"]
        rc, exited_at = shut.exits["scripted"]
        assert rc == -signal.SIGKILL and exited_at >= shut.deadline_ms
        assert lam.crashes == []  # killed after SHUTDOWN: not a crash
    finally:
        lam.close()


def test_fake_reports_an_exit_outside_shutdown_as_a_crash_even_with_status_0(tmp_path):
    lam = LambdaEnvironment(scripted_layer(tmp_path, "exit0-on-invoke"), tmp_path / "w", {},
                            PLAIN_HANDLER)
    try:
        assert lam.start().ok, lam.logs()
        res = lam.invoke({})
        assert res.status == "error" and res.error_type == "Extension.Crash", res
        assert lam.crashes == [("scripted", 0, "invoke")]
    finally:
        lam.close()
