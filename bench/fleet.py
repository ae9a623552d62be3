#!/usr/bin/env python3
"""Fleet benchmark: N Lambda environments starting at once against a throttled Parameter Store.

    .venv/bin/python bench/fleet.py [--n 60] [--k 10] [--rate 40] [--scenarios LIST] [--json]

Run it from the repository root with a Python that has boto3 and moto[server] (the
project's dev venv); it is also a section of bench/bench.py. Parameter Store allows about
40 calls a second per account and region by default, shared by GetParameter,
GetParameters and GetParametersByPath. N cold starts that each read K parameters cost
N*K single calls, or N*ceil(K/10) with GetParameters; at R calls a second nobody can have
every value sooner than calls/R seconds, and Lambda's INIT has a 10-second limit.

What runs, all on loopback:

- moto (ThreadedMotoServer, in this process), seeded once with K parameters
  /fleet/p00 .. with distinct values;
- a throttling proxy (in this process) in front of it: ONE token bucket for the account,
  R tokens a second, shared by AmazonSSM.GetParameter, GetParameters and
  GetParametersByPath (X-Amz-Target). A call that finds no token is answered as AWS
  answers it (HTTP 400, ThrottlingException, "Rate exceeded") without reaching moto and
  costs no token; an accepted call is forwarded to moto byte for byte. Secrets Manager
  calls pass unthrottled (no scenario makes any);
- per scenario, N "functions" (threads of this process, one per environment, each with
  its own keep-alive connection) that read K parameters at INIT.

Scenarios (--scenarios, comma-separated; default all, in this order):

    one-by-one     N extensions started together (as the layer's bootstrap execs them, or
                   with --as-script as `<python> -S extension.py`); each function waits for
                   its extension to listen, then makes K sequential /get calls
    get-multiple   the same, one get-multiple call with the K names
    prefetch       the extensions started with PARAMETERS_SECRETS_EXTENSION_PREFETCH naming
                   the K parameters; the functions then read one by one
    boto3          no extension: the functions call boto3 directly (one client each, standard
                   retry mode, created before the start), K sequential get_parameter calls

Printed per scenario: functions that got every value (checked), errors their callers saw
(any answer but a 200 with the right values), AWS calls accepted / throttled, the time
from the start signal until the last function had its values, the lower limit N*calls/R
(calls: K one by one, ceil(K/10) with get-multiple or prefetch), the ratio, and the
target with pass or miss. The start signal releases every function at once: for the
extensions, once all N processes are spawned (some are still starting); for boto3, once
its clients exist. Every wait is bounded; the extensions are stopped at the end of each
scenario, and the bucket is full again at the start of the next.
Exit status: 0 when the benchmark ran (even with misses), 2 when it could not run.
"""

import argparse
import collections
import contextlib
import http.client
import json
import logging
import math
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
PREFIX = "/fleet/p"

DEFAULT_N = 60  # environments; 60 extension processes is what 2 cores start within a second or two
DEFAULT_K = 10  # parameters each function reads at INIT
DEFAULT_RATE = 40.0  # Parameter Store's default: about 40 calls a second per account and region
NAMES_PER_GET_PARAMETERS = 10  # GetParameters takes at most 10 names
MAX_GET_MULTIPLE_NAMES = 50  # the extension's get-multiple takes at most 50 names

SCENARIOS = ("one-by-one", "get-multiple", "prefetch", "boto3")
LABELS = {
    "one-by-one": "one by one through the extension",
    "get-multiple": "one get-multiple call",
    "prefetch": "prefetch configured, then one by one",
    "boto3": "boto3 directly, standard retries",
}

# The calls that share Parameter Store's account-wide read quota.
THROTTLED_TARGETS = frozenset(("AmazonSSM.GetParameter", "AmazonSSM.GetParameters",
                               "AmazonSSM.GetParametersByPath"))
THROTTLE_BODY = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'

CLIENT_TIMEOUT_S = 30.0  # one request of a function; nothing may hang
LISTEN_WAIT_S = 30.0  # a function waits this long at most for its extension to listen
REFILL_S = 1.0  # pause between scenarios: the machine settles and the bucket refills


def scenario_cap_s(n, k, rate):
    """How long a scenario may last before its unfinished functions are counted as
    unfinished: three times the one-by-one limit plus half a minute (the slowest honest
    design needs about the limit)."""
    return 3.0 * n * k / rate + 30.0


_STARTED = time.perf_counter()


def log(message):
    """Progress goes to stderr so that --json keeps stdout clean."""
    print(f"[fleet {time.perf_counter() - _STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def names_and_values(k):
    """{name: value} of the K parameters; random values, so a value from an earlier run or
    another name can never pass the check."""
    width = max(2, len(str(k - 1)))
    run = secrets.token_hex(4)
    return {f"{PREFIX}{i:0{width}d}": f"fleet-{i:0{width}d}-{run}" for i in range(k)}


def calls_per_function(scenario, k):
    """AWS calls one function's K values need at best: K single calls, or ceil(K/10)
    GetParameters calls."""
    return k if scenario in ("one-by-one", "boto3") else math.ceil(k / NAMES_PER_GET_PARAMETERS)


# ------------------------------------------------------------------ the throttle


class TokenBucket:
    """capacity tokens at most, refilled at rate tokens a second; take() spends one.
    The clock is injectable so that the arithmetic is tested without waiting."""

    def __init__(self, rate, capacity, clock=time.monotonic):
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        """Full again (what a pause of capacity/rate seconds would give)."""
        with self._lock:
            self._tokens = self.capacity
            self._last = self.clock()

    def take(self):
        with self._lock:
            now = self.clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "content-length"))


class ThrottleProxy(ThreadingHTTPServer):
    """Parameter Store's account-wide read quota in front of moto (see the module doc).

    Counts, per X-Amz-Target, the calls accepted and throttled; keeps the time of every
    accepted call (to check the rate afterwards) and how long moto took to answer it."""

    daemon_threads = True
    # 60 extensions and 60 boto3 clients connect at once: the default backlog of 5 would
    # drop SYNs and add one-second retransmissions that are the benchmark's, not theirs.
    request_queue_size = 1024

    def __init__(self, upstream_port, rate, capacity, clock=time.monotonic):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.bucket = TokenBucket(rate, capacity, clock)
        self.clock = clock
        self._lock = threading.Lock()
        self.reset()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls
        return conn, addr

    def reset(self):
        """Counters emptied and the bucket full: a new scenario."""
        with self._lock:
            self.counts = collections.Counter()  # (target, "accepted" | "throttled" | "upstream error")
            self.accepted_at = []
            self.upstream_ms = []
        self.bucket.reset()

    def admit(self, target):
        """True when the call may go to moto; counted either way."""
        allowed = target not in THROTTLED_TARGETS or self.bucket.take()
        with self._lock:
            self.counts[(target, "accepted" if allowed else "throttled")] += 1
            if allowed:
                self.accepted_at.append(self.clock())
        return allowed

    def upstream_done(self, elapsed_s, failed):
        with self._lock:
            self.upstream_ms.append(elapsed_s * 1000.0)
            if failed:
                self.counts[("", "upstream error")] += 1

    def snapshot(self):
        """The figures of the scenario so far."""
        with self._lock:
            counts = dict(self.counts)
            times = list(self.accepted_at)
            upstream = sorted(self.upstream_ms)
        by_target = collections.defaultdict(dict)
        for (target, outcome), count in counts.items():
            by_target[target or "-"][outcome] = count
        ssm = [(t, o, c) for (t, o), c in counts.items() if t in THROTTLED_TARGETS]
        # The most calls accepted within any one second: at most capacity + rate.
        peak, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= 1.0:
                start += 1
            peak = max(peak, end - start + 1)
        return {
            "accepted": sum(c for _, o, c in ssm if o == "accepted"),
            "throttled": sum(c for _, o, c in ssm if o == "throttled"),
            "by_target": dict(by_target),
            "upstream_errors": counts.get(("", "upstream error"), 0),
            "peak_accepted_in_1s": peak,
            "upstream_ms": {"p50": statistics.median(upstream), "max": upstream[-1]} if upstream else None,
        }


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the extension and boto3 reuse connections
    timeout = 120  # an idle client connection is closed eventually, never held forever

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""  # read even when throttled: keep-alive
        target = self.headers.get("X-Amz-Target", "")
        if not self.server.admit(target):
            self.throttled()
            return
        self.forward(body)

    do_GET = do_PUT = do_DELETE = do_POST

    def throttled(self):
        """AWS's answer to a call over the quota (JSON 1.1 protocol)."""
        self.send_response_only(400, "Bad Request")
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("x-amzn-ErrorType", "ThrottlingException")
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(THROTTLE_BODY)))
        self.end_headers()
        self.wfile.write(THROTTLE_BODY)

    def forward(self, body):
        began = time.perf_counter()
        status, reason, headers, data, failed = forward_to_moto(self, body)
        self.server.upstream_done(time.perf_counter() - began, failed)
        answer_from_moto(self, status, reason, headers, data)


# Both proxies (this one and bench/refresh_ahead.py's) forward and answer the same way.


def forward_to_moto(handler, body):
    """The call a handler received (method, path, headers Host included: a signature
    covers them) to moto at handler.server.upstream_port: (status, reason, headers, data,
    failed), a 502 ProxyError when moto cannot be reached."""
    upstream = http.client.HTTPConnection("127.0.0.1", handler.server.upstream_port, timeout=30)
    try:
        upstream.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
        for name, value in handler.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        return response.status, response.reason, response.getheaders(), response.read(), False
    except OSError as exc:
        data = json.dumps({"__type": "ProxyError", "message": str(exc)}).encode()
        return 502, "Bad Gateway", [("Content-Type", "application/json")], data, True
    finally:
        upstream.close()


def answer_from_moto(handler, status, reason, headers, data):
    """moto's answer to the caller, but for its framing headers, Server and Date."""
    handler.send_response_only(status, reason)
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP and name.lower() not in ("server", "date"):
            handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


# ------------------------------------------------------------------ moto


def start_moto():
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; that would drown the output and slow moto down.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


@contextlib.contextmanager
def moto_behind(make_proxy):
    """(proxy, moto's port): moto, and make_proxy(moto_port) serving in front of it; both
    stopped at the end (this benchmark's and bench/refresh_ahead.py's)."""
    moto, moto_port = start_moto()
    proxy = make_proxy(moto_port)
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield proxy, moto_port
    finally:
        proxy.shutdown()
        proxy.server_close()
        moto.stop()


def boto3_session():
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name=REGION)


def seed(moto_port, values):
    """The K parameters, straight to moto (not through the throttle), in a moto emptied
    first: moto's state is per process, shared with any server started here before
    (bench.py's, with its 1,000 parameters)."""
    reset = urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", data=b"", method="POST")
    with urllib.request.urlopen(reset, timeout=30) as answer:
        answer.read()
    ssm = boto3_session().client("ssm", endpoint_url=f"http://127.0.0.1:{moto_port}")
    for name, value in values.items():
        ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)


# ------------------------------------------------------------------ functions


class StartSignal:
    """Releases every function at once; t0 (perf_counter) is set before the release, so
    a released function always sees it."""

    def __init__(self):
        self._event = threading.Event()
        self.t0 = None

    def give(self, t0=None):
        self.t0 = time.perf_counter() if t0 is None else t0
        self._event.set()

    def wait(self):
        self._event.wait()
        return self.t0


class Function:
    """What one function saw: errors by kind, and when it had every value."""

    def __init__(self, index):
        self.index = index
        self.errors = collections.Counter()  # kind -> count
        self.done_at = None  # seconds from the start signal, once every value was right
        self.finished_at = None  # seconds from the start signal, when it stopped reading
        self.connected_at = None  # seconds from the start signal, when its extension took the connection

    @property
    def error_count(self):
        return sum(self.errors.values())


def free_ports(count):
    """count distinct ports, free a moment ago on 127.0.0.1 and (where the host has it) ::1,
    since the extension binds both. Bound all at once, so no two are the same."""
    held, ports = [], []
    try:
        while len(ports) < count:
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s4)
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                held.append(s6)
                s6.bind(("::1", port))
            except OSError as exc:
                if exc.errno not in (97, 99):  # 97, 99: no IPv6 here, 127.0.0.1 is enough
                    continue  # ::1 has it: keep this socket held, so it is not picked again
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def connect_when_listening(port, proc, deadline):
    """A connection to the extension, retried while it is refused: Lambda starts the
    function's runtime only once the extension has registered, which it does after
    binding. None when the process died or the wait ran out."""
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if proc.poll() is not None or time.perf_counter() >= deadline:
                return None
            time.sleep(0.02)  # as the extension's own wrapper polls; 60 threads polling faster would eat a core


def read_answer(conn, path, token, deadline):
    conn.timeout = max(0.1, min(CLIENT_TIMEOUT_S, deadline - time.perf_counter()))
    if conn.sock is not None:
        conn.sock.settimeout(conn.timeout)
    conn.request("GET", path, headers={TOKEN_HEADER: token})
    response = conn.getresponse()
    return response.status, response.read()


def error_kind(status, body):
    try:
        kind = json.loads(body).get("__type", "")
    except (ValueError, AttributeError):
        kind = ""
    return f"{status} {kind}".strip()


def parameters_in(body):
    """{name: value} of a /get or get-multiple answer; {} for one that is not that shape
    (which the caller counts as a wrong value, not as a crash of the benchmark)."""
    try:
        answer = json.loads(body)
        items = answer["Parameters"] if "Parameters" in answer else [answer["Parameter"]]
        return {item["Name"]: item["Value"] for item in items}
    except (ValueError, TypeError, KeyError):
        return {}


def extension_function(fn, mode, port, proc, token, values, start, cap_s):
    """One function reading its parameters through its own extension, at INIT."""
    t0 = start.wait()
    deadline = t0 + cap_s
    conn = None
    try:
        sock = connect_when_listening(port, proc, min(deadline, t0 + LISTEN_WAIT_S))
        if sock is None:
            fn.errors["extension not listening"] += 1
            return
        fn.connected_at = time.perf_counter() - t0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        conn.sock = sock
        right = 0
        if mode == "get-multiple":
            names = ",".join(urllib.parse.quote(name, safe="/") for name in values)
            try:
                status, body = read_answer(conn, f"/systemsmanager/parameters/get-multiple?names={names}",
                                           token, deadline)
            except (OSError, http.client.HTTPException) as exc:
                fn.errors[f"client: {type(exc).__name__}"] += 1
            else:
                if status != 200:
                    fn.errors[error_kind(status, body)] += 1
                else:
                    got = parameters_in(body)
                    for name, value in values.items():
                        if got.get(name) == value:
                            right += 1
                        else:
                            fn.errors["missing from get-multiple" if name not in got else "wrong value"] += 1
        else:
            for name, value in values.items():
                path = "/systemsmanager/parameters/get?name=" + urllib.parse.quote(name, safe="")
                try:
                    status, body = read_answer(conn, path, token, deadline)
                except (OSError, http.client.HTTPException) as exc:
                    fn.errors[f"client: {type(exc).__name__}"] += 1
                    conn.close()  # the next request opens a new connection
                    continue
                if status != 200:
                    fn.errors[error_kind(status, body)] += 1
                elif parameters_in(body).get(name) == value:
                    right += 1
                else:
                    fn.errors["wrong value"] += 1
        if right == len(values):
            fn.done_at = time.perf_counter() - t0
    finally:
        fn.finished_at = time.perf_counter() - t0
        if conn is not None:
            conn.close()


def boto3_function(fn, client, values, start):
    """One function calling Parameter Store with boto3 at INIT, as the usual alternative."""
    from botocore.exceptions import BotoCoreError, ClientError

    t0 = start.wait()
    right = 0
    try:
        for name, value in values.items():
            try:
                got = client.get_parameter(Name=name)["Parameter"]["Value"]
            except ClientError as exc:
                fn.errors[exc.response.get("Error", {}).get("Code", "ClientError")] += 1
                continue
            except BotoCoreError as exc:
                fn.errors[type(exc).__name__] += 1
                continue
            if got == value:
                right += 1
            else:
                fn.errors["wrong value"] += 1
        if right == len(values):
            fn.done_at = time.perf_counter() - t0
    finally:
        fn.finished_at = time.perf_counter() - t0


# ------------------------------------------------------------------ scenarios


def extension_env(port, endpoint, token, prefetch):
    # Built from scratch: nothing from the caller's AWS set-up may leak in, and no
    # AWS_LAMBDA_RUNTIME_API (standalone mode). The extension's defaults otherwise: no
    # TIMEOUT_MILLIS, the default log level.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_SESSION_TOKEN": token,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
    }
    if prefetch:
        env["PARAMETERS_SECRETS_EXTENSION_PREFETCH"] = prefetch
    return env


def stop_processes(procs):
    """SIGTERM to all at once, then reap each (SIGKILL after 10 s); their CPU time is
    counted in RUSAGE_CHILDREN once reaped."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    codes = collections.Counter()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        codes[proc.returncode] += 1
    return dict(codes)


# Each environment's process waits here, before the extension's interpreter even starts,
# until the start signal: it says it is ready (one byte on fd READY), blocks reading fd GO
# until the benchmark closes the other end, closes both and execs the extension in place
# (same process, a fresh interpreter). So all N extensions start at one instant, as a
# fleet's do, whatever the time the benchmark takes to spawn N processes.
HOLD = ("import os, sys\n"
        "ready, go = int(sys.argv[1]), int(sys.argv[2])\n"
        "os.write(ready, b'.')\n"
        "os.read(go, 1)\n"
        "os.close(ready)\n"
        "os.close(go)\n"
        "os.execv(sys.argv[3], sys.argv[3:])\n")
HOLD_READY_S = 60.0  # N held processes all ready within this, or the scenario cannot run


def spawn_held(n, python, argv, cwd, envs, logdir, mode):
    """N processes held before argv, ready to be released together: (procs, go_fd).
    Closing go_fd releases them all; if it is never closed, SIGTERM ends them."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    procs = []
    try:
        for i, env in enumerate(envs):
            with open(os.path.join(logdir, f"{mode}-{i:03d}.log"), "wb") as out:
                procs.append(subprocess.Popen([python, "-S", "-c", HOLD, str(ready_w), str(go_r), *argv], env=env,
                                              cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, pass_fds=(ready_w, go_r)))
        os.close(ready_w)
        ready_w = None
        waiting = n
        deadline = time.perf_counter() + HOLD_READY_S
        while waiting:
            if not select.select([ready_r], [], [], max(0.0, deadline - time.perf_counter()))[0]:
                raise RuntimeError(f"only {n - waiting} of {n} processes got ready in {HOLD_READY_S:.0f} s")
            got = os.read(ready_r, waiting)
            if not got:
                raise RuntimeError(f"a held process exited before its release ({n - waiting} of {n} ready)")
            waiting -= len(got)
        return procs, go_w
    except BaseException:
        os.close(go_w)
        stop_processes(procs)
        raise
    finally:
        for fd in (ready_r, ready_w, go_r):
            if fd is not None:
                os.close(fd)


def run_extensions(mode, n, python, command, proxy_url, values, logdir, cap_s):
    """N extensions started together, a function each; returns (functions, details)."""
    token = secrets.token_hex(24)
    ports = free_ports(n)
    prefetch = " ".join(f"ssm:{name}" for name in values) if mode == "prefetch" else ""
    functions = [Function(i) for i in range(n)]
    start = StartSignal()
    details = {}
    spawned = time.perf_counter()
    argv, cwd = command
    procs, go = spawn_held(n, python, argv, cwd, [extension_env(port, proxy_url, token, prefetch) for port in ports],
                           logdir, mode)
    details["spawn_s"] = time.perf_counter() - spawned
    threads = []
    try:
        for fn, port, proc in zip(functions, ports, procs):
            thread = threading.Thread(target=extension_function, daemon=True,
                                      args=(fn, mode, port, proc, token, values, start, cap_s))
            thread.start()
            threads.append(thread)
        # The start signal: every extension starts and every function is released at once.
        # The extensions' start-up (60 interpreters on 2 cores) is in the times, as a
        # fleet's is in its INIT.
        start.give()
        os.close(go)
        go = None
        deadline = start.t0 + cap_s
        for thread in threads:
            thread.join(max(0.0, deadline + 1.0 - time.perf_counter()))
        details["unfinished"] = sum(1 for t in threads if t.is_alive())
    finally:
        if go is not None:
            os.close(go)
        details["exit_codes"] = stop_processes(procs)
    for fn, thread in zip(functions, threads):
        if thread.is_alive():
            fn.errors["unfinished at the scenario's cap"] += 1
    listening = [fn.connected_at for fn in functions if fn.connected_at is not None]
    details["last_listening_s"] = max(listening) if listening else None
    return functions, details


def run_boto3(n, proxy_url, values, cap_s):
    """The same N functions calling boto3 directly: one client each (standard retry mode),
    created before the start signal since creating one is heavy (so boto3's import and
    client creation are not in its figures, where the extensions' start-up after the
    signal is in theirs). One thread per function, all in this process, as the
    extensions' functions are."""
    from botocore.config import Config

    session = boto3_session()
    config = Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=CLIENT_TIMEOUT_S)
    clients = [session.client("ssm", endpoint_url=proxy_url, config=config) for _ in range(n)]
    functions = [Function(i) for i in range(n)]
    start = StartSignal()
    threads = [threading.Thread(target=boto3_function, args=(fn, client, values, start), daemon=True)
               for fn, client in zip(functions, clients)]
    for thread in threads:
        thread.start()
    start.give()
    deadline = start.t0 + cap_s
    for thread in threads:
        thread.join(max(0.0, deadline + 1.0 - time.perf_counter()))
    unfinished = 0
    for fn, thread in zip(functions, threads):
        if thread.is_alive():
            unfinished += 1
            fn.errors["unfinished at the scenario's cap"] += 1
    for client in clients:
        client.close()
    return functions, {"unfinished": unfinished}


def log_facts(logdir, mode):
    """How many WARN and ERROR lines the scenario's extensions logged, and the last lines of
    one log, for a reader who wants to know what the extensions said."""
    warns = errors = 0
    sample = ""
    for name in sorted(os.listdir(logdir)):
        if not name.startswith(f"{mode}-"):
            continue
        with open(os.path.join(logdir, name), errors="replace") as f:
            lines = f.read().splitlines()
        warns += sum(1 for line in lines if "] WARN " in line)
        errors += sum(1 for line in lines if "] ERROR " in line)
        if not sample and any("] WARN " in line or "] ERROR " in line for line in lines):
            sample = "\n".join(lines[-5:])
    return {"warn_lines": warns, "error_lines": errors, "sample_log_tail": sample}


def judge(name, n, k, ok, errors, accepted, last_s, limit_s):
    """(target text, passed or None): issue 18's targets for the extension's scenarios; the
    boto3 row is the reference."""
    if name == "one-by-one":
        return "0 errors", errors == 0 and ok == n
    if name in ("get-multiple", "prefetch"):
        budget = 1.1 * n * math.ceil(k / NAMES_PER_GET_PARAMETERS)
        time_limit = 1.5 * limit_s + 1.0
        passed = errors == 0 and ok == n and accepted <= budget and last_s is not None and last_s <= time_limit
        return f"<= {budget:.0f} calls, 0 errors, last <= {time_limit:.2f} s", passed
    return "-", None


def run_scenario(name, n, k, rate, python, command, proxy, values, logdir):
    cap_s = scenario_cap_s(n, k, rate)
    cpu_before = time.process_time()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    if name == "boto3":
        functions, details = run_boto3(n, proxy.url, values, cap_s)
    else:
        functions, details = run_extensions(name, n, python, command, proxy.url, values, logdir, cap_s)
        details.update(log_facts(logdir, name))
    wall_s = time.perf_counter() - began
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    counts = proxy.snapshot()  # every extension has stopped: no call is still to come
    ok = [fn for fn in functions if fn.done_at is not None]
    errors = sum(fn.error_count for fn in functions)
    kinds = collections.Counter()
    for fn in functions:
        kinds.update(fn.errors)
    calls = calls_per_function(name, k)
    limit_s = n * calls / rate
    last_s = max(fn.done_at for fn in ok) if ok else None
    target, passed = judge(name, n, k, len(ok), errors, counts["accepted"], last_s, limit_s)
    return {
        "scenario": name,
        "label": LABELS[name],
        "functions": n,
        "with_every_value": len(ok),
        "errors": errors,
        "error_kinds": dict(kinds.most_common()),
        "accepted": counts["accepted"],
        "throttled": counts["throttled"],
        "calls_per_function": calls,
        "last_with_values_s": last_s,
        "all_finished_s": max((fn.finished_at for fn in functions if fn.finished_at is not None), default=None),
        "limit_s": limit_s,
        "ratio": None if last_s is None else last_s / limit_s,
        "target": target,
        "passed": passed,
        "wall_s": wall_s,
        "cpu_s": {"this_process": time.process_time() - cpu_before,
                  "extensions": (children_after.ru_utime + children_after.ru_stime
                                 - children_before.ru_utime - children_before.ru_stime)},
        "proxy": counts,
        **details,
    }


def machine():
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}


LAYER_NAME = "parameters-secrets-extension"


def extension_command(python, extension, logdir, as_script):
    """(argv, cwd) of one extension. By default as the layer's bootstrap execs it: from
    its hash-checked bytecode (as build_layer.sh ships it), `-E -s -S -u -m extension`;
    with as_script, `-S extension.py`, which compiles the source at every start (about
    twice the CPU: 60 of them at once on 2 cores take a second longer to be up)."""
    if as_script:
        return [python, "-S", str(extension)], logdir
    layer = Path(logdir) / "opt" / LAYER_NAME
    (layer / "__pycache__").mkdir(parents=True)
    shutil.copyfile(extension, layer / "extension.py")
    code = ("import importlib.util, py_compile, sys; py_compile.compile(sys.argv[1], "
            "cfile=importlib.util.cache_from_source(sys.argv[1]), dfile='extension.py', doraise=True, "
            "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)")
    subprocess.run([python, "-I", "-S", "-c", code, str(layer / "extension.py")], check=True)
    return [python, "-E", "-s", "-S", "-u", "-m", "extension", LAYER_NAME], str(layer)


def measure(python, extension, n=DEFAULT_N, k=DEFAULT_K, rate=DEFAULT_RATE, capacity=None, scenarios=SCENARIOS,
            as_script=False):
    """Every scenario in turn against one moto and one throttle; the results as a dict."""
    capacity = rate if capacity is None else capacity
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)  # boto3 must talk to the loopback throttle directly
    began = time.perf_counter()
    result = {"settings": {"n": n, "k": k, "rate": rate, "capacity": capacity, "scenarios": list(scenarios),
                           "extension_started": ("as a script" if as_script
                                                 else "from bytecode, as the layer's bootstrap does"),
                           "load_average_at_start": os.getloadavg()[0], **machine()},
              "scenarios": []}
    values = names_and_values(k)
    with moto_behind(lambda moto_port: ThrottleProxy(moto_port, rate, capacity)) as (proxy, moto_port), \
            tempfile.TemporaryDirectory(prefix="fleet-") as logdir:
        seed(moto_port, values)
        command = extension_command(python, extension, logdir, as_script)
        for index, name in enumerate(scenarios):
            if index:
                time.sleep(REFILL_S)  # let the machine settle after the last scenario's processes
            proxy.reset()  # counters emptied, bucket full
            log(f"{LABELS[name]}: {n} functions x {k} parameters at {rate:g} calls/s")
            result["scenarios"].append(run_scenario(name, n, k, rate, python, command, proxy, values, logdir))
    result["settings"]["load_average_at_end"] = os.getloadavg()[0]
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


# ------------------------------------------------------------------ reporting


def seconds(value):
    """Two decimals below 10 s (a limit of 0.75 s is not 0.8 s), one above."""
    return "-" if value is None else f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def verdict(passed):
    return "info" if passed is None else ("pass" if passed else "miss")


def notes(s):
    """One line of details per scenario: where the errors came from and how the pieces
    (moto, this process, the extensions) kept up."""
    parts = []
    if s["error_kinds"]:
        parts.append("errors: " + ", ".join(f"{kind} x{count}" for kind, count in s["error_kinds"].items()))
    parts.append(f"all functions done at {seconds(s['all_finished_s'])}")
    if s.get("last_listening_s") is not None:
        parts.append(f"the last extension listening at {s['last_listening_s']:.2f} s")
    p = s["proxy"]
    parts.append("calls by target: " + ", ".join(
        f"{target.split('.')[-1]} {counts.get('accepted', 0):,}/{counts.get('throttled', 0):,}"
        for target, counts in sorted(p["by_target"].items())))
    if p["upstream_ms"]:
        parts.append(f"moto answered accepted calls in {p['upstream_ms']['p50']:.1f} ms p50, "
                     f"{p['upstream_ms']['max']:.0f} ms max")
    parts.append(f"peak accepted in 1 s: {p['peak_accepted_in_1s']}")
    if p["upstream_errors"]:
        parts.append(f"PROXY COULD NOT REACH MOTO {p['upstream_errors']} times")
    extensions = f", extensions {s['cpu_s']['extensions']:.1f} s" if "spawn_s" in s else ""
    parts.append(f"CPU: this process {s['cpu_s']['this_process']:.1f} s{extensions} in {s['wall_s']:.1f} s")
    if "warn_lines" in s:
        parts.append(f"extension logs: {s['warn_lines']} WARN, {s['error_lines']} ERROR lines")
    if s.get("unfinished"):
        parts.append(f"{s['unfinished']} functions UNFINISHED at the cap")
    codes = s.get("exit_codes")
    if codes and set(codes) != {0}:
        parts.append(f"extension exit codes {codes}")
    return "; ".join(parts)


def report(result):
    """Rows for bench.py's table: (figure, value, reference, note, ratio, target, passed)."""
    st = result["settings"]
    rows = []
    for s in result["scenarios"]:
        ratio = "" if s["ratio"] is None else f"last {seconds(s['last_with_values_s'])} = {s['ratio']:.2f}x "
        rows.append((f"{s['label']} ({st['n']} x {st['k']} at {st['rate']:g}/s)",
                     f"{s['with_every_value']} of {s['functions']} ok, {s['errors']} errors",
                     f"calls {s['accepted']:,} / {s['throttled']:,} thr", notes(s),
                     f"{ratio}limit {seconds(s['limit_s'])}", s["target"], s["passed"]))
    return rows


COLUMNS = ("how the functions read", "functions with every value", "errors callers saw",
           "calls accepted / throttled", "last with its values", "limit N*calls/R", "ratio", "target", "result")


def print_table(result, out=sys.stdout):
    st = result["settings"]
    out.write(f"fleet: N={st['n']} functions started at once, K={st['k']} parameters each, R={st['rate']:g} calls/s "
              f"(one bucket for GetParameter, GetParameters and GetParametersByPath, capacity {st['capacity']:g}); "
              f"extensions started {st['extension_started']}\n")
    out.write(f"machine: {st['cpu']}, {st['cpus']} CPUs, Python {st['python']}; load average (1 min) "
              f"{st['load_average_at_start']:.1f} at start, {st['load_average_at_end']:.1f} at end; "
              f"ran {result['seconds']} s\n\n")
    table = [COLUMNS]
    for s in result["scenarios"]:
        table.append((s["label"], f"{s['with_every_value']} of {s['functions']}", f"{s['errors']:,}",
                       f"{s['accepted']:,} / {s['throttled']:,}", seconds(s["last_with_values_s"]),
                       seconds(s["limit_s"]), "-" if s["ratio"] is None else f"{s['ratio']:.2f}x",
                       s["target"], verdict(s["passed"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for index, row in enumerate(table):
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")
    out.write("\nnotes:\n")
    for s in result["scenarios"]:
        out.write(f"- {s['label']}: {notes(s)}\n")


# ------------------------------------------------------------------ main


def scenario_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown or text!r}; choose from {', '.join(SCENARIOS)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"environments started at once (default {DEFAULT_N})")
    p.add_argument("--k", type=int, default=DEFAULT_K,
                   help=f"parameters each function reads, 1 to {MAX_GET_MULTIPLE_NAMES} (default {DEFAULT_K})")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help=f"Parameter Store calls a second the account may make (default {DEFAULT_RATE:g})")
    p.add_argument("--capacity", type=float, default=None,
                   help="the token bucket's capacity (default: the rate, a one-second burst)")
    p.add_argument("--scenarios", type=scenario_list, default=list(SCENARIOS),
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--python", default=os.path.realpath(sys.executable),
                   help="interpreter for the extensions (run with -S; default: this one, resolved)")
    p.add_argument("--extension", default=str(ROOT / "extension.py"), help="path of extension.py")
    p.add_argument("--as-script", action="store_true",
                   help="start the extensions as `python -S extension.py` (compiled at every start) instead of "
                        "as the layer does, from hash-checked bytecode")
    args = p.parse_args(argv)
    if args.n < 1 or not 1 <= args.k <= MAX_GET_MULTIPLE_NAMES or args.rate <= 0:
        p.error(f"--n must be at least 1, --k from 1 to {MAX_GET_MULTIPLE_NAMES}, --rate above 0")
    if args.capacity is not None and args.capacity < 1:
        p.error("--capacity must be at least 1 (a call needs one token)")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.extension).is_file():
        print(f"fleet: {args.extension} not found", file=sys.stderr)
        return 2
    try:
        result = measure(args.python, args.extension, args.n, args.k, args.rate, args.capacity, args.scenarios,
                         args.as_script)
    except ImportError as exc:
        print(f"fleet: {exc}: it needs boto3 and moto[server]; run it with the dev venv "
              "(.venv/bin/python bench/fleet.py)", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"fleet: could not complete: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
