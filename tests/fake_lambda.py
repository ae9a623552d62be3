"""A stdlib fake of the AWS Lambda Runtime API and Extensions API, with a tiny runtime.

It runs a built layer the way Lambda does (facts: the Lambda developer guide's Extensions
API and Runtime API pages and the open-source Runtime Interface Emulator (RIE); the 403
bodies follow the RIE's handlers; what the RIE does not show, freezes and SnapStart, is
in the project's docs/pitfalls.md, "Lambda's real life"):

* the layer zip is unpacked into a temporary "/opt" (modes kept) and every plain file
  in ``opt/extensions/`` is started (at most 10), all at once, with the function's
  environment plus ``AWS_LAMBDA_RUNTIME_API=127.0.0.1:<port>``;
* init gate: the runtime starts only after every one of those files has registered
  under its own file name; init completes only when the runtime and every registered
  extension wait in their ``next`` call; registration then closes; init is limited
  (10 s by default);
* ``POST /register`` validates like Lambda: empty name ``Extension.InvalidExtensionName``,
  bad JSON ``InvalidRequestFormat``, unknown event ``Extension.InvalidEventType``, a name
  that matches no file is an *internal* extension, which may not subscribe to SHUTDOWN
  (``SHUTDOWN: ShutdownEventNotSupportedForInternalExtension``), registering twice
  ``Extension.InvalidExtensionState``, after init ``Extension.RegistrationClosed``;
* ``GET /event/next``, ``POST /init/error``, ``POST /exit/error`` check the identifier:
  ``Extension.MissingExtensionIdentifier`` / ``InvalidExtensionIdentifier`` (not a UUID) /
  ``UnknownExtensionIdentifier``; the error calls need
  ``Lambda-Extension-Function-Error-Type`` and answer ``202 {"status":"OK"}``; an
  init/error after the extension's first /event/next is ``InvalidExtensionState``;
* INVOKE goes to every extension subscribed to it (``deadlineMs``, ``requestId``,
  ``invokedFunctionArn``, ``tracing``) and to the runtime; the invocation ends only when
  the runtime answered and every extension is back in ``/event/next``;
* SHUTDOWN: the runtime gets SIGTERM (300 ms, then SIGKILL), then every extension
  subscribed to SHUTDOWN gets ``{"eventType":"SHUTDOWN","deadlineMs":...,
  "shutdownReason":...}`` with the deadline 2000 ms after the shutdown began;
  stragglers are SIGKILLed at the deadline and recorded;
* any extension exit outside SHUTDOWN is recorded as ``Extension.Crash`` (even exit 0),
  and an invocation during which that happens fails with ``Extension.Crash``;
* runtime wrapper: when the function's environment sets ``AWS_LAMBDA_EXEC_WRAPPER``
  (not empty), the runtime is started as ``$AWS_LAMBDA_EXEC_WRAPPER <runtime command...>``
  (here ``<wrapper> <python> <workdir>/runtime.py``), executed directly like any
  program, as Lambda does with the path it is given (developer guide, "Modifying the
  runtime environment", wrapper scripts); its stderr goes to the runtime's log;
* an environment value given as ``bytes`` is passed as those bytes (e.g. not UTF-8);
  a ``str`` as its UTF-8 (``surrogateescape``) encoding, ``None`` removes the variable;
* the environment carries ``AWS_LAMBDA_INITIALIZATION_TYPE``: ``on-demand`` by default,
  ``init_type="snap-start"`` for the INIT of a SnapStart version (after which Lambda
  snapshots the memory of every process and restores it, possibly days later, in a
  new environment: the monotonic clock does not count the time in between, the wall
  clock is set right);
* freeze (docs/pitfalls.md): between events Lambda freezes every process of the
  environment, the monotonic clock running on. ``freeze_between_invokes=seconds``
  SIGSTOPs the process group of every extension and of the runtime when INIT or an
  invocation ends, and SIGCONTs them when the next invocation or SHUTDOWN is sent, no
  sooner than ``seconds`` after the freeze began (a test talking to a process between
  invocations would block: the processes are stopped). ``freeze(seconds)`` freezes on
  demand (``freeze()`` with no duration: until ``thaw()`` or the next event); each
  freeze's length is recorded in ``freezes``;
* wall clock (opt-in, ``faketime=True``; needs libfaketime, see ``find_libfaketime``):
  every process starts with ``LD_PRELOAD`` = libfaketime, ``FAKETIME_DONT_FAKE_MONOTONIC=1``
  and ``FAKETIME_NO_CACHE=1``, reading its offset from a timestamp file (``+0`` at
  first) that ``set_wall_clock_offset(seconds)`` rewrites: ``time.time()`` moves,
  ``time.monotonic()`` does not, as after a SnapStart restore; the ``deadlineMs`` of
  later events is on the moved clock, as Lambda's and the environment's clocks agree
  (the times the fake records stay real). With that setting
  ``time.sleep()`` fails with EINVAL on Python 3.11+ (libfaketime issue 426): the
  runtime gets a ``sitecustomize`` that sleeps with ``select`` instead; the extension,
  started by its bootstrap with ``python -E -s -S``, gets none, so it must not call
  ``time.sleep`` while the wall clock is faked.

The runtime side is a small Python process implementing the Runtime API loop
(``/2018-06-01/runtime/invocation/next``, ``.../response``, ``.../error``,
``/runtime/init/error``) that imports the handler module the test provides; handler
results come back from ``invoke()``.

Use as a context manager::

    with LambdaEnvironment(layer_zip, tmp_path, env={...}, task_files={...}) as lam:
        init = lam.start()
        result = lam.invoke({"k": "v"})
        shutdown = lam.shutdown("spindown")

A SnapStart restore three days after INIT::

    with LambdaEnvironment(layer_zip, tmp_path, env, files, init_type="snap-start",
                           faketime=True) as lam:
        lam.start()
        lam.set_wall_clock_offset(3 * 86400)
        result = lam.invoke({})
"""

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXT_BASE = "/2020-01-01/extension"
RUNTIME_BASE = "/2018-06-01/runtime"
ACCOUNT_ID = "123456789012"
MAX_EXTENSIONS = 10
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# The values Lambda gives AWS_LAMBDA_INITIALIZATION_TYPE (developer guide, "Defined
# runtime environment variables").
INIT_TYPES = ("on-demand", "provisioned-concurrency", "snap-start")

# Where Debian's package ``libfaketime`` puts the library (the directory is named after
# the architecture's multiarch triplet), and other usual places.
LIBFAKETIME_GLOBS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                     "/usr/local/lib/faketime/libfaketime.so.1", "/usr/lib64/faketime/libfaketime.so.1")

# sitecustomize for a Python process whose wall clock libfaketime fakes with
# FAKETIME_DONT_FAKE_MONOTONIC=1: time.sleep() fails with EINVAL there on Python 3.11+
# (libfaketime issue 426); select() with a timeout is not intercepted.
SLEEP_SHIM = """\
import select as _select
import time as _time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _select.select([], [], [], seconds)


_time.sleep = _sleep
"""


def find_libfaketime():
    """The path of libfaketime.so.1 if it is installed (Debian: ``apt-get install
    libfaketime``), else None."""
    import glob

    for pattern in LIBFAKETIME_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def faketime_env(library, timestamp_file):
    """The variables that make libfaketime move ``time.time()`` by the offset written in
    ``timestamp_file`` (re-read at every call) while ``time.monotonic()`` stays real."""
    return {"LD_PRELOAD": library, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_TIMESTAMP_FILE": str(timestamp_file), "FAKETIME_NO_CACHE": "1"}


def write_wall_clock_offset(timestamp_file, seconds):
    """Set the offset (whole seconds, may be negative) that ``faketime_env`` processes
    add to the real wall clock. Written to a new file then renamed, so a process never
    reads a half-written offset."""
    tmp = str(timestamp_file) + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{int(seconds):+d}\n")
    os.replace(tmp, str(timestamp_file))

# The Runtime API loop of the function side; written to the work dir and run with the
# test's Python. It calls the handler exactly as Lambda's Python runtime would.
RUNTIME_SOURCE = r'''
import importlib
import json
import os
import sys
import time
import traceback
import urllib.request

API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"


def post(path, body, error_type=None):
    headers = {"Content-Type": "application/json"}
    if error_type:
        headers["Lambda-Runtime-Function-Error-Type"] = error_type
    data = json.dumps(body).encode()
    req = urllib.request.Request(API + path, data=data, method="POST", headers=headers)
    with urllib.request.urlopen(req) as resp:
        resp.read()


def error_body(exc):
    return {"errorMessage": str(exc), "errorType": type(exc).__name__,
            "stackTrace": traceback.format_exception(type(exc), exc, exc.__traceback__)}


class Context:
    def __init__(self, request_id, deadline_ms, arn):
        self.aws_request_id = request_id
        self.invoked_function_arn = arn
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(0, self._deadline_ms - int(time.time() * 1000))


def main():
    sys.path.insert(0, os.environ["LAMBDA_TASK_ROOT"])
    module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:  # init code failed: report it as Lambda's runtimes do
        post("/init/error", error_body(exc), "Runtime.Init." + type(exc).__name__)
        sys.exit(1)
    while True:
        with urllib.request.urlopen(API + "/invocation/next") as resp:
            request_id = resp.headers["Lambda-Runtime-Aws-Request-Id"]
            deadline_ms = int(resp.headers["Lambda-Runtime-Deadline-Ms"])
            arn = resp.headers["Lambda-Runtime-Invoked-Function-Arn"]
            event = json.loads(resp.read())
        try:
            result = handler(event, Context(request_id, deadline_ms, arn))
        except Exception as exc:
            post("/invocation/" + request_id + "/error", error_body(exc), "Unhandled")
        else:
            post("/invocation/" + request_id + "/response", result)


main()
'''


def _forbidden(error_type, message):
    return 403, {"errorMessage": message, "errorType": error_type}


class ProtocolError(Exception):
    """Raised when the test drives the fake in a way Lambda never would."""


class Extension:
    """One registered extension (external: started from a file; internal: not)."""

    def __init__(self, name, events, external, accept_feature):
        self.id = str(uuid.uuid4())
        self.name = name
        self.events = tuple(events)
        self.external = external
        self.accept_feature = accept_feature
        self.pending = []          # events not yet handed out
        self.waiting = False       # blocked in /event/next right now
        self.next_calls = 0
        self.delivered = []        # every event handed out, in order
        self.registered_at = time.monotonic()
        self.first_next_at = None


class ExtensionProcess:
    """A process started from a file in opt/extensions/."""

    def __init__(self, name, proc, log_path):
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.started_at = time.monotonic()
        self.exited_at = None
        self.returncode = None
        self.shutdown_sent = False
        self.killed = False


class InitResult:
    def __init__(self, ok, error_type, detail):
        self.ok = ok
        self.error_type = error_type  # None when ok
        self.detail = detail

    def __repr__(self):
        return f"InitResult(ok={self.ok}, error_type={self.error_type!r}, detail={self.detail!r})"


class InvokeResult:
    def __init__(self, request_id, status, payload, error_type, raw):
        self.request_id = request_id
        self.status = status          # "success" or "error"
        self.payload = payload        # parsed JSON answer of the runtime (or error body)
        self.error_type = error_type  # None on success
        self.raw = raw

    def __repr__(self):
        return (f"InvokeResult({self.status!r}, error_type={self.error_type!r}, "
                f"payload={self.payload!r})")


class ShutdownResult:
    def __init__(self, reason, deadline_ms, exits, killed, runtime_killed, sent_at_ms):
        self.reason = reason
        self.deadline_ms = deadline_ms  # the deadlineMs sent (on the processes' wall clock)
        self.sent_at_ms = sent_at_ms
        self.exits = exits            # name -> (returncode, exit time as epoch ms)
        self.killed = killed          # names SIGKILLed at the deadline
        self.runtime_killed = runtime_killed

    def __repr__(self):
        return (f"ShutdownResult(reason={self.reason!r}, exits={self.exits!r}, "
                f"killed={self.killed!r})")


def _now_ms():
    return int(time.time() * 1000)


def _wait_stopped(pid, timeout=2.0):
    """Wait until process ``pid`` is stopped (or gone). SIGSTOP is delivered
    asynchronously; /proc/PID/stat's third field is ``T`` once it took effect. Where there
    is no /proc, returns at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


def unpack_layer(layer_zip, opt_dir):
    """Unzip like Lambda does into ``opt_dir``, keeping the Unix modes the zip records."""
    with zipfile.ZipFile(layer_zip) as zf:
        for info in zf.infolist():
            target = os.path.join(opt_dir, info.filename)
            if not os.path.realpath(target).startswith(os.path.realpath(opt_dir)):
                raise ProtocolError(f"zip entry escapes the layer: {info.filename}")
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())
            mode = (info.external_attr >> 16) & 0o7777
            os.chmod(target, mode if mode else 0o644)


class LambdaEnvironment:
    """One Lambda execution environment: the fake API server, the extensions, the runtime."""

    def __init__(self, layer_zip, workdir, env, task_files, handler="handler.handler",
                 function_name="my-function", init_timeout=10.0, shutdown_ms=2000,
                 runtime_sigterm_ms=300, python=None, on_register=None, extra_opt=None,
                 init_type="on-demand", freeze_between_invokes=None, faketime=False):
        self.layer_zip = layer_zip
        self.workdir = str(workdir)
        self.function_name = function_name
        self.handler = handler
        self.function_arn = f"arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:{function_name}"
        self.init_timeout = init_timeout
        self.shutdown_ms = shutdown_ms
        self.runtime_sigterm_ms = runtime_sigterm_ms
        self.python = python or sys.executable
        self.task_files = dict(task_files)
        self.user_env = dict(env)
        # Called as on_register(name) in the /register handler thread BEFORE the answer
        # is sent: lets a test act while the extension is blocked in /register.
        self.on_register = on_register
        self.extra_opt = dict(extra_opt or {})
        if init_type not in INIT_TYPES:
            raise ProtocolError(f"init_type must be one of {INIT_TYPES}, not {init_type!r}")
        self.init_type = init_type
        # Seconds every process stays frozen between two events (None: never frozen).
        self.freeze_between_invokes = freeze_between_invokes
        self.freezes = []             # length in seconds of every freeze, in order
        self._frozen_at = None        # monotonic time the current freeze began
        self._freeze_min = 0.0        # how long the current freeze lasts at least
        self._frozen_groups = []      # process groups the current freeze stopped

        self.cv = threading.Condition()
        self.extensions = {}          # id -> Extension
        self.processes = {}           # file name -> ExtensionProcess
        self.registration_closed = False
        self.phase = "created"        # created, init, ready, invoke, shutdown, failed, closed
        self.init_errors = []         # (extension name, error type, body)
        self.exit_errors = []         # (extension name, error type, body)
        self.crashes = []             # (name, returncode, phase)
        self.runtime_init_errors = []  # (error type, body)
        self.protocol_errors = []     # (path, errorType) of every 403 the fake sent
        self.registrations = []       # (name, events, headers) of every successful /register
        self.events_log = []          # (epoch ms, what) for ordering assertions
        self.runtime_proc = None
        self.runtime_started_at = None
        self.runtime_waiting = False
        self.runtime_pending = []
        self.runtime_exit = None
        self.current = None           # the invocation in progress (dict)
        self.env_failure = None       # why the environment is dead (error type)
        self._threads = []

        self.opt_dir = os.path.join(self.workdir, "opt")
        self.task_dir = os.path.join(self.workdir, "task")
        self.log_dir = os.path.join(self.workdir, "logs")
        for d in (self.opt_dir, self.task_dir, self.log_dir):
            os.makedirs(d, exist_ok=True)
        self.faketime_library = None
        self.timestamp_file = None
        self.wall_clock_offset = 0
        self.shim_dir = None
        if faketime:
            self.faketime_library = find_libfaketime()
            if self.faketime_library is None:
                raise ProtocolError("faketime=True needs libfaketime (Debian: apt-get install libfaketime)")
            self.timestamp_file = os.path.join(self.workdir, "faketime-offset")
            write_wall_clock_offset(self.timestamp_file, 0)
            self.shim_dir = os.path.join(self.workdir, "faketime-site")
            os.makedirs(self.shim_dir, exist_ok=True)
            with open(os.path.join(self.shim_dir, "sitecustomize.py"), "w") as f:
                f.write(SLEEP_SHIM)

        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = io.BytesIO()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data.getvalue()
                        data.write(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method):
                body = self._body()
                path = self.path.split("?", 1)[0]
                try:
                    status, payload, headers = fake._route(method, path, self.headers, body)
                except BrokenPipeError:
                    return
                if status == 403:
                    fake.protocol_errors.append((path, payload.get("errorType")))
                try:
                    self._send(status, payload, headers)
                except OSError:
                    pass  # the caller is gone (e.g. killed while waiting for an event)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.api = f"127.0.0.1:{self.port}"
        self._serve_thread = threading.Thread(target=self.server.serve_forever,
                                              kwargs={"poll_interval": 0.05}, daemon=True)
        self._serve_thread.start()

    # ------------------------------------------------------------------ environment

    def function_env(self):
        """The environment every process of this execution environment starts with."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "AWS_LAMBDA_RUNTIME_API": self.api,
            "AWS_LAMBDA_FUNCTION_NAME": self.function_name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
            "AWS_LAMBDA_INITIALIZATION_TYPE": self.init_type,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "LAMBDA_TASK_ROOT": self.task_dir,
            "_HANDLER": self.handler,
            # Lambda's Python runtimes have /var/lang/bin/python3; here the bootstrap is
            # pointed at the test's interpreter instead.
            "PARAMETERS_SECRETS_EXTENSION_PYTHON": self.python,
        }
        if self.faketime_library is not None:
            env.update(faketime_env(self.faketime_library, self.timestamp_file))
        for key, value in self.user_env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value if isinstance(value, bytes) else str(value)
        return env

    def _log(self, what):
        self.events_log.append((_now_ms(), what))

    def _process_now_ms(self):
        """Epoch ms on the processes' wall clock: real time unless ``set_wall_clock_offset``
        moved it. Event deadlines are given in it; every time the fake records
        (``events_log``, exit times, ``sent_at_ms``) is real time."""
        return _now_ms() + self.wall_clock_offset * 1000

    # ------------------------------------------------------------------ HTTP routes

    def _route(self, method, path, headers, body):
        if path.startswith(EXT_BASE + "/"):
            return self._route_extension(method, path[len(EXT_BASE):], headers, body)
        if path.startswith(RUNTIME_BASE + "/"):
            return self._route_runtime(method, path[len(RUNTIME_BASE):], headers, body)
        return 404, {"errorMessage": "unknown path " + path, "errorType": "NotFound"}, ()

    def _ext_by_header(self, headers):
        ident = headers.get("Lambda-Extension-Identifier")
        if not ident:
            return None, _forbidden("Extension.MissingExtensionIdentifier",
                                    "Missing Lambda-Extension-Identifier header")
        if not UUID_RE.match(ident):
            return None, _forbidden("Extension.InvalidExtensionIdentifier",
                                    "Invalid Lambda-Extension-Identifier")
        ext = self.extensions.get(ident)
        if ext is None:
            return None, _forbidden("Extension.UnknownExtensionIdentifier",
                                    "Unknown extension " + ident)
        return ext, None

    def _route_extension(self, method, path, headers, body):
        if path == "/register" and method == "POST":
            status, payload, hdrs = self._register(headers, body)
            return status, payload, hdrs
        if path == "/event/next" and method == "GET":
            return self._event_next(headers)
        if path in ("/init/error", "/exit/error") and method == "POST":
            return self._error(path, headers, body)
        return 404, {"errorMessage": "unknown path", "errorType": "NotFound"}, ()

    def _register(self, headers, body):
        name = headers.get("Lambda-Extension-Name") or ""
        if not name:
            return (*_forbidden("Extension.InvalidExtensionName", "Empty extension name"), ())
        try:
            request = json.loads(body)
            events = request["events"]
            if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
                raise ValueError("events must be a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            return (*_forbidden("InvalidRequestFormat", str(exc)), ())
        with self.cv:
            external = name in self.processes
            for event in events:
                if event not in ("INVOKE", "SHUTDOWN"):
                    return (*_forbidden("Extension.InvalidEventType",
                                        f"{event}: ErrorInvalidEventType"), ())
                if event == "SHUTDOWN" and not external:
                    return (*_forbidden(
                        "Extension.InvalidEventType",
                        "SHUTDOWN: ShutdownEventNotSupportedForInternalExtension"), ())
            if self.registration_closed:
                return (*_forbidden("Extension.RegistrationClosed",
                                    "Extension registration closed already"), ())
            if any(e.name == name for e in self.extensions.values()):
                return (*_forbidden(
                    "Extension.InvalidExtensionState",
                    f"State transition from Registered to Registered failed for extension "
                    f"{name}. Error: State transition is not allowed"), ())
            if len(self.extensions) >= MAX_EXTENSIONS:
                return (*_forbidden("Extension.TooManyExtensions",
                                    f"Extension limit ({MAX_EXTENSIONS}) reached"), ())
            feature = headers.get("Lambda-Extension-Accept-Feature") or ""
        if self.on_register is not None:
            self.on_register(name)
        with self.cv:
            if self.registration_closed:
                return (*_forbidden("Extension.RegistrationClosed",
                                    "Extension registration closed already"), ())
            ext = Extension(name, events, external, feature)
            self.extensions[ext.id] = ext
            self.registrations.append((name, list(events), dict(headers.items())))
            self._log(f"register {name}")
            self.cv.notify_all()
        answer = {"functionName": self.function_name, "functionVersion": "$LATEST",
                  "handler": self.handler}
        if "accountId" in [f.strip() for f in feature.split(",")]:
            answer["accountId"] = ACCOUNT_ID
        return 200, answer, (("Lambda-Extension-Identifier", ext.id),)

    def _event_next(self, headers):
        with self.cv:
            ext, error = self._ext_by_header(headers)
            if error:
                return (*error, ())
            if ext.waiting:
                return (*_forbidden(
                    "Extension.InvalidExtensionState",
                    f"State transition from Ready to Ready failed for extension {ext.id}. "
                    "Error: State transition is not allowed"), ())
            ext.waiting = True
            ext.next_calls += 1
            if ext.first_next_at is None:
                ext.first_next_at = time.monotonic()
            self._log(f"next {ext.name}")
            self.cv.notify_all()
            while not ext.pending and self.phase != "closed":
                self.cv.wait(0.5)
            if not ext.pending:
                ext.waiting = False
                return 500, {"errorMessage": "environment closed", "errorType": "Closed"}, ()
            event = ext.pending.pop(0)
            ext.waiting = False
            ext.delivered.append(event)
            kind = event["eventType"] if isinstance(event, dict) else "raw bytes"
            self._log(f"deliver {kind} {ext.name}")
            self.cv.notify_all()
        return 200, event, (("Lambda-Extension-Event-Identifier", str(uuid.uuid4())),)

    def _error(self, path, headers, body):
        kind = "init" if path == "/init/error" else "exit"
        with self.cv:
            ext, error = self._ext_by_header(headers)
            if error:
                return (*error, ())
            error_type = headers.get("Lambda-Extension-Function-Error-Type")
            if not error_type:
                return (*_forbidden("Extension.MissingHeader",
                                    "Lambda-Extension-Function-Error-Type not found"), ())
            if kind == "init" and (ext.first_next_at is not None or self.phase != "init"):
                return (*_forbidden(
                    "Extension.InvalidExtensionState",
                    f"State transition from Ready to InitError failed for extension {ext.id}. "
                    "Error: State transition is not allowed"), ())
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body.decode("utf-8", "replace")
            (self.init_errors if kind == "init" else self.exit_errors).append(
                (ext.name, error_type, parsed))
            self._log(f"{kind}/error {ext.name} {error_type}")
            # Both end the execution environment (the first fatal error wins).
            if self.env_failure is None:
                self.env_failure = error_type
            self.cv.notify_all()
        return 202, {"status": "OK"}, ()

    def _route_runtime(self, method, path, headers, body):
        if path == "/invocation/next" and method == "GET":
            with self.cv:
                if self.runtime_waiting:
                    return 403, {"errorMessage": "already waiting",
                                 "errorType": "InvalidStateTransition"}, ()
                self.runtime_waiting = True
                self._log("runtime next")
                self.cv.notify_all()
                while not self.runtime_pending and self.phase != "closed":
                    self.cv.wait(0.5)
                self.runtime_waiting = False
                if not self.runtime_pending:
                    return 500, {"errorMessage": "closed", "errorType": "Closed"}, ()
                inv = self.runtime_pending.pop(0)
                self.cv.notify_all()
            hdrs = (("Lambda-Runtime-Aws-Request-Id", inv["request_id"]),
                    ("Lambda-Runtime-Deadline-Ms", str(inv["deadline_ms"])),
                    ("Lambda-Runtime-Invoked-Function-Arn", self.function_arn),
                    ("Lambda-Runtime-Trace-Id", inv["trace"]))
            return 200, inv["payload"], hdrs
        m = re.match(r"^/invocation/([^/]+)/(response|error)$", path)
        if m and method == "POST":
            with self.cv:
                inv = self.current
                if inv is None or inv["request_id"] != m.group(1):
                    return 400, {"errorMessage": "Invalid request ID",
                                 "errorType": "InvalidRequestID"}, ()
                if inv.get("answer") is not None:
                    return 403, {"errorMessage": "already answered",
                                 "errorType": "InvalidStateTransition"}, ()
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = body.decode("utf-8", "replace")
                if m.group(2) == "response":
                    inv["answer"] = ("success", parsed, None)
                else:
                    inv["answer"] = ("error", parsed,
                                     headers.get("Lambda-Runtime-Function-Error-Type") or "Unhandled")
                self._log(f"runtime {m.group(2)}")
                self.cv.notify_all()
            return 202, {"status": "OK"}, ()
        if path == "/init/error" and method == "POST":
            with self.cv:
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = body.decode("utf-8", "replace")
                self.runtime_init_errors.append(
                    (headers.get("Lambda-Runtime-Function-Error-Type"), parsed))
                if self.env_failure is None:
                    self.env_failure = headers.get("Lambda-Runtime-Function-Error-Type") or "Runtime.InitError"
                self._log("runtime init/error")
                self.cv.notify_all()
            return 202, {"status": "OK"}, ()
        return 404, {"errorMessage": "unknown path", "errorType": "NotFound"}, ()

    # ------------------------------------------------------------------ processes

    def _watch(self, proc_rec):
        proc_rec.proc.wait()
        with self.cv:
            proc_rec.returncode = proc_rec.proc.returncode
            proc_rec.exited_at = _now_ms()
            self._log(f"exit {proc_rec.name} {proc_rec.returncode}")
            if not proc_rec.shutdown_sent and self.phase != "closed":
                # Any exit other than after SHUTDOWN is a crash, even status 0
                # (docs/design.md, "The Lambda Extensions API").
                self.crashes.append((proc_rec.name, proc_rec.returncode, self.phase))
                if self.env_failure is None:
                    self.env_failure = "Extension.Crash"
            self.cv.notify_all()

    def _watch_runtime(self):
        self.runtime_proc.wait()
        with self.cv:
            self.runtime_exit = self.runtime_proc.returncode
            self._log(f"runtime exit {self.runtime_exit}")
            if self.phase not in ("shutdown", "closed") and self.env_failure is None:
                self.env_failure = "Runtime.ExitError"
            self.cv.notify_all()

    def _spawn(self, argv, log_name, cwd, extra_env=None):
        log_path = os.path.join(self.log_dir, log_name + ".log")
        log = open(log_path, "ab")
        env = self.function_env()
        env.update(extra_env or {})
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        finally:
            log.close()
        return proc, log_path

    def _thread(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def logs(self, name=None):
        """The output (stdout+stderr) of extension ``name``, or of all processes."""
        names = [name] if name else sorted(n[:-4] for n in os.listdir(self.log_dir))
        out = []
        for n in names:
            path = os.path.join(self.log_dir, n + ".log")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
                out.append(text if name else f"--- {n} ---\n{text}")
        return "".join(out) if name else "\n".join(out)

    # ------------------------------------------------------------------ lifecycle

    def _wait(self, predicate, deadline):
        """Wait on the condition (held) until predicate() or the monotonic deadline."""
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.cv.wait(min(remaining, 0.1))
        return True

    def start(self):
        """Run the init phase; return an ``InitResult``."""
        unpack_layer(self.layer_zip, self.opt_dir)
        for rel, content in self.extra_opt.items():
            path = os.path.join(self.opt_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
        for rel, content in self.task_files.items():
            with open(os.path.join(self.task_dir, rel), "w") as f:
                f.write(content)
        runtime_path = os.path.join(self.workdir, "runtime.py")
        with open(runtime_path, "w") as f:
            f.write(RUNTIME_SOURCE)

        ext_dir = os.path.join(self.opt_dir, "extensions")
        files = sorted(n for n in os.listdir(ext_dir)) if os.path.isdir(ext_dir) else []
        files = [n for n in files if stat.S_ISREG(os.stat(os.path.join(ext_dir, n)).st_mode)]
        if len(files) > MAX_EXTENSIONS:
            raise ProtocolError("more than 10 extensions")
        deadline = time.monotonic() + self.init_timeout
        with self.cv:
            self.phase = "init"
            for name in files:
                path = os.path.join(ext_dir, name)
                proc, log_path = self._spawn([path], "ext-" + name, self.task_dir)
                rec = ExtensionProcess(name, proc, log_path)
                self.processes[name] = rec
                self._log(f"start {name}")
            for rec in self.processes.values():
                self._thread(self._watch, rec)

            def all_registered():
                names = {e.name for e in self.extensions.values()}
                return all(n in names for n in self.processes) or self.env_failure
            if not self._wait(all_registered, deadline):
                return self._init_failed("Sandbox.Timedout",
                                         "not every extension registered in time")
            if self.env_failure:
                return self._init_failed(self.env_failure, "failed before the runtime started")

            # Every extension registered: now (and only now) the runtime starts.
            self.runtime_started_at = time.monotonic()
            self._log("runtime start")
            extra = None
            if self.faketime_library is not None:
                # The runtime's time.sleep must work under libfaketime (see SLEEP_SHIM).
                path = self.function_env().get("PYTHONPATH")
                extra = {"PYTHONPATH": self.shim_dir + (os.pathsep + path if path else "")}
            command = [self.python, runtime_path]
            wrapper = self.function_env().get("AWS_LAMBDA_EXEC_WRAPPER")
            if wrapper:  # Lambda runs the wrapper with the runtime's command line
                command = [os.fsdecode(wrapper)] + command
            self.runtime_proc, _ = self._spawn(command, "runtime", self.task_dir, extra)
            self._thread(self._watch_runtime)

            def all_ready():
                return self.env_failure or (
                    self.runtime_waiting
                    and all(e.waiting for e in self.extensions.values()))
            if not self._wait(all_ready, deadline):
                return self._init_failed("Sandbox.Timedout", "init did not complete in time")
            if self.env_failure:
                return self._init_failed(self.env_failure, "init failed")
            self.registration_closed = True
            self.phase = "ready"
            self._log("init done")
        self._freeze_after_event()
        return InitResult(True, None, None)

    def _init_failed(self, error_type, detail):
        self.phase = "failed"
        self.registration_closed = True
        self._log(f"init failed {error_type}")
        return InitResult(False, error_type, detail)

    def deliver_raw(self, data):
        """Answer every extension's pending /event/next with these bytes, as they are: a
        broken event, for testing how an extension handles a fault after init."""
        with self.cv:
            for ext in self.extensions.values():
                ext.pending.append(bytes(data))
            self.cv.notify_all()

    def invoke(self, payload=None, timeout=10.0):
        """Run one invocation; return an ``InvokeResult`` once Lambda would end it."""
        self._thaw_for_event()
        with self.cv:
            if self.phase != "ready":
                raise ProtocolError(f"cannot invoke in phase {self.phase} "
                                    f"(failure: {self.env_failure})")
            self.phase = "invoke"
            request_id = str(uuid.uuid4())
            # In the processes' wall clock, as Lambda's and the restored microVM's agree.
            deadline_ms = self._process_now_ms() + int(timeout * 1000)
            trace = (f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                     f"Parent={uuid.uuid4().hex[:16]};Sampled=0")
            inv = {"request_id": request_id, "deadline_ms": deadline_ms, "trace": trace,
                   "payload": payload if payload is not None else {}, "answer": None}
            self.current = inv
            subscribers = [e for e in self.extensions.values() if "INVOKE" in e.events]
            calls_before = {e.id: e.next_calls for e in subscribers}
            event = {"eventType": "INVOKE", "deadlineMs": deadline_ms, "requestId": request_id,
                     "invokedFunctionArn": self.function_arn,
                     "tracing": {"type": "X-Amzn-Trace-Id", "value": trace}}
            for ext in subscribers:
                ext.pending.append(dict(event))
            self.runtime_pending.append(inv)
            self._log(f"invoke {request_id}")
            self.cv.notify_all()

            def done():
                if self.env_failure:
                    return True
                return inv["answer"] is not None and all(
                    e.waiting and not e.pending and e.next_calls > calls_before[e.id]
                    for e in subscribers)
            finished = self._wait(done, time.monotonic() + timeout)
            self.current = None
            if self.env_failure:
                self.phase = "failed"
                return InvokeResult(request_id, "error", inv["answer"], self.env_failure, inv)
            if not finished:
                self.phase = "failed"
                self.env_failure = "Sandbox.Timedout"
                return InvokeResult(request_id, "error", None, "Sandbox.Timedout", inv)
            self.phase = "ready"
            status, body, error_type = inv["answer"]
        self._freeze_after_event()
        return InvokeResult(request_id, status, body, error_type, inv)

    def shutdown(self, reason="spindown"):
        """Shut the environment down as Lambda does; return a ``ShutdownResult``."""
        self._thaw_for_event()
        with self.cv:
            if self.phase in ("shutdown", "closed"):
                raise ProtocolError("already shut down")
            self.phase = "shutdown"
            began_ms = _now_ms()
            real_deadline_ms = began_ms + self.shutdown_ms
            deadline_ms = self._process_now_ms() + self.shutdown_ms  # what the event says
            self._log(f"shutdown {reason}")
        runtime_killed = False
        if self.runtime_proc is not None and self.runtime_proc.poll() is None:
            self.runtime_proc.send_signal(signal.SIGTERM)
            try:
                self.runtime_proc.wait(self.runtime_sigterm_ms / 1000)
            except subprocess.TimeoutExpired:
                self._kill(self.runtime_proc)
                runtime_killed = True
        with self.cv:
            sent_at = _now_ms()
            event = {"eventType": "SHUTDOWN", "deadlineMs": deadline_ms,
                     "shutdownReason": reason}
            by_name = {e.name: e for e in self.extensions.values()}
            for name, rec in self.processes.items():
                rec.shutdown_sent = True
                ext = by_name.get(name)
                if ext is not None and "SHUTDOWN" in ext.events:
                    ext.pending.append(dict(event))
            self.cv.notify_all()
            deadline = time.monotonic() + (real_deadline_ms - _now_ms()) / 1000
            self._wait(lambda: all(r.exited_at is not None for r in self.processes.values()),
                       deadline)
            stragglers = [r for r in self.processes.values() if r.exited_at is None]
        killed = []
        for rec in stragglers:
            rec.killed = True
            killed.append(rec.name)
            self._kill(rec.proc)
        with self.cv:
            self._wait(lambda: all(r.exited_at is not None for r in self.processes.values()),
                       time.monotonic() + 5)
            exits = {r.name: (r.returncode, r.exited_at) for r in self.processes.values()}
            self._log(f"shutdown done killed={killed}")
        return ShutdownResult(reason, deadline_ms, exits, killed, runtime_killed, sent_at)

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def kill_extension(self, name, sig=signal.SIGKILL):
        """Send ``sig`` to the extension process started from file ``name``."""
        os.killpg(self.processes[name].proc.pid, sig)

    # ------------------------------------------------------------------ freeze and clock

    def _live_groups(self):
        """The process group ids (= pids: each process starts its own session) of every
        extension and of the runtime that still run."""
        procs = [r.proc for r in self.processes.values()]
        if self.runtime_proc is not None:
            procs.append(self.runtime_proc)
        return [p.pid for p in procs if p.poll() is None]

    @property
    def frozen(self):
        return self._frozen_at is not None

    def freeze(self, seconds=None):
        """SIGSTOP every process of the environment, as Lambda freezes it between events.

        With ``seconds``: SIGCONT them ``seconds`` after the freeze began, then return.
        Without: they stay stopped until ``thaw()``, ``invoke()`` or ``shutdown()``.
        Returns once every process is actually stopped (Linux: state T in /proc).
        """
        if self._frozen_at is None:
            self._frozen_groups = self._live_groups()
            for pgid in self._frozen_groups:
                try:
                    os.killpg(pgid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    pass
            for pgid in self._frozen_groups:
                _wait_stopped(pgid)
            self._frozen_at = time.monotonic()
            self._freeze_min = 0.0
            self._log("freeze")
        if seconds is not None:
            self._freeze_min = max(self._freeze_min, float(seconds))
            self.thaw()

    def thaw(self):
        """SIGCONT what ``freeze`` stopped, once the freeze has lasted its minimum."""
        if self._frozen_at is None:
            return
        remaining = self._frozen_at + self._freeze_min - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for pgid in self._frozen_groups:
            try:
                os.killpg(pgid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        self.freezes.append(time.monotonic() - self._frozen_at)
        self._frozen_at = None
        self._log("thaw")

    def _freeze_after_event(self):
        if self.freeze_between_invokes is not None and self.phase == "ready":
            self.freeze()
            self._freeze_min = float(self.freeze_between_invokes)

    def _thaw_for_event(self):
        self.thaw()

    def set_wall_clock_offset(self, seconds):
        """Move the wall clock (``time.time()``) of every process to real time + ``seconds``;
        their monotonic clocks stay real. Needs ``faketime=True``. Takes effect at their
        next clock reading (libfaketime re-reads the file every time)."""
        if self.timestamp_file is None:
            raise ProtocolError("set_wall_clock_offset needs LambdaEnvironment(..., faketime=True)")
        write_wall_clock_offset(self.timestamp_file, seconds)
        self.wall_clock_offset = int(seconds)
        self._log(f"wall clock offset {int(seconds):+d} s")

    def close(self):
        """Kill whatever still runs and stop the API server (idempotent)."""
        with self.cv:
            if self.phase == "closed":
                return
            self.phase = "closed"
            self.cv.notify_all()
        procs = [r.proc for r in self.processes.values()]
        if self.runtime_proc is not None:
            procs.append(self.runtime_proc)
        for proc in procs:
            if proc.poll() is None:
                self._kill(proc)
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
