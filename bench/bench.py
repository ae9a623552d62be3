#!/usr/bin/env python3
"""Benchmark: the extension against its floor and against the SDK path.

    python3 bench/bench.py [--json] [--quick] [--strict] [--no-refresh-ahead] [--no-fleet]

Run it from the repository root with a Python that has boto3 and moto[server] (the
project's dev venv). It starts everything it needs on loopback and takes under two
minutes (about 55 s, then the refresh-ahead section, bench/refresh_ahead.py: about 15 s,
then the fleet section, bench/fleet.py: about 25 s with today's extension, up to a minute
with one that waits out the throttle; with --quick about 55 s in all, with a refresh-ahead
loop of 3 s and a fleet of 30; --no-refresh-ahead and --no-fleet skip those sections):

- a moto server (ThreadedMotoServer, in this process) seeded with the benchmark
  parameter, a secret and 1,000 parameters of 4 KB;
- a counting proxy (in this process) between the extension and moto, so the AWS calls
  the extension makes can be counted;
- the real extension, ``<python> -S extension.py``: a clean interpreter, because a
  site-packages ``.pth`` file adds start-up time and memory that are not the extension's;
- the floor, ``<python> -S bench/floor_server.py``: a bare ThreadingHTTPServer that
  answers every GET with a constant body as long as the extension's answer.

Absolute times on a shared machine are noisy, so every target is a ratio between
figures taken in the same run, and the extension and the floor are measured in
alternation. Each row shows its target and prints pass or miss.
Exit status: 0 when the benchmark ran (even with misses; --strict: 1 on any miss),
2 when it could not run.
"""

import argparse
import collections
import http.client
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import coldstart  # bench/coldstart.py, beside this file
import fleet  # bench/fleet.py, beside this file
import refresh_ahead  # bench/refresh_ahead.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
FLOOR_SCRIPT = ROOT / "bench" / "floor_server.py"

REGION = "us-east-1"
TOKEN = secrets.token_hex(24)  # the request token (AWS_SESSION_TOKEN of the extension)
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
CACHE_HEADER = "X-Parameters-Secrets-Cache"

PARAM = "/bench/param"  # the parameter every latency and throughput figure reads
PARAM_VALUE = "postgres://bench:5432/app?sslmode=require"
SECRET = "bench/secret"
COLD_PARAM = "/bench/cold"  # read first by the 64 concurrent cold requests
TTL_PARAM = "/bench/ttl"  # read 1,000 times within the TTL
FILL_PREFIX = "/bench/fill/p"  # 1,000 parameters of 4 KB for the memory figure
FILL_VALUE_SIZE = 4096  # Parameter Store standard tier: values up to 4 KB

PARAM_PATH = "/systemsmanager/parameters/get?name=%2Fbench%2Fparam"
SECRET_PATH = "/secretsmanager/get?secretId=bench%2Fsecret"
STALL_MS = 40.0  # a delayed-ACK stall costs ~40 ms (docs/pitfalls.md, "Delayed-ACK stall")
MIB = 1024 * 1024


class Settings:
    """How much of each measurement to do; --quick trades precision for time."""

    def __init__(self, quick):
        self.latency_requests = 600 if quick else 2400  # per client style and server
        self.latency_warmup = 50 if quick else 200
        self.latency_blocks = 4 if quick else 8  # p99 is judged on the median block
        self.boto3_calls = 60 if quick else 200
        self.fresh_process_runs = 3 if quick else 5
        self.throughput_clients = 8
        self.throughput_seconds = 0.5  # one window
        self.throughput_rounds = 8 if quick else 20  # windows per side, alternating
        self.cold_start_runs = 5 if quick else 7
        self.lambda_cold_start_runs = 7 if quick else 15
        self.fill_count = 1000  # the target is about 1,000 values even with --quick
        self.concurrent_cold = 64
        self.ttl_requests = 1000
        # The fleet: N environments at once, K parameters each, Parameter Store's 40 calls/s.
        self.fleet_n = 30 if quick else fleet.DEFAULT_N
        self.fleet_k = fleet.DEFAULT_K
        self.fleet_rate = fleet.DEFAULT_RATE
        # Refresh ahead: one key read every 5 ms across TTL windows of 1 s, REFRESH_AHEAD 0 and 80.
        self.refresh_ahead_seconds = 4.0 if quick else refresh_ahead.DEFAULT_SECONDS


_STARTED = time.perf_counter()


def log(message):
    """Progress goes to stderr so that --json keeps stdout clean."""
    print(f"[bench {time.perf_counter() - _STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def percentile(samples, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def summarize(samples_ms):
    return {
        "n": len(samples_ms),
        "p50_ms": statistics.median(samples_ms),
        "p99_ms": percentile(samples_ms, 0.99),
        "max_ms": max(samples_ms),
        "over_40ms": sum(1 for s in samples_ms if s > STALL_MS),
    }


def free_port():
    """A port free on 127.0.0.1 and, where the host has it, on ::1 (the extension binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError as exc:
                if exc.errno in (97, 99):  # no IPv6 on this host: 127.0.0.1 is enough
                    return port
                continue
            return port
    raise RuntimeError("no free port found")


def rss_mib(pid):
    """Resident set size of a process, from /proc/<pid>/status (VmRSS is in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_description():
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "os": platform.platform(),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------- moto and its proxy


def start_moto():
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO to stderr; that would drown the output and
    # slow moto down.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    return server, port


def aws_client(service, endpoint):
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed(endpoint, fill_count):
    """Create the benchmark's parameters and secret in moto (threads: moto's answers overlap)."""
    ssm = aws_client("ssm", endpoint)
    ssm.put_parameter(Name=PARAM, Value=PARAM_VALUE, Type="String")
    ssm.put_parameter(Name=COLD_PARAM, Value="cold", Type="String")
    ssm.put_parameter(Name=TTL_PARAM, Value="ttl", Type="String")
    aws_client("secretsmanager", endpoint).create_secret(
        Name=SECRET, SecretString=json.dumps({"username": "bench", "password": "not-a-real-one"})
    )
    value = "v" * FILL_VALUE_SIZE

    def put(i):
        ssm.put_parameter(Name=f"{FILL_PREFIX}{i:04d}", Value=value, Type="String")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(fill_count)))


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class CountingProxy(ThreadingHTTPServer):
    """Forwards every request to moto and counts them by (X-Amz-Target, Name or SecretId).

    An optional delay before forwarding keeps a cold fetch in flight long enough for
    64 concurrent requests to all arrive while it is pending.
    """

    daemon_threads = True

    def __init__(self, upstream_port):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._calls = collections.Counter()

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr

    def record(self, target, key):
        with self._lock:
            self._calls[(target, key)] += 1

    def reset(self):
        with self._lock:
            self._calls.clear()

    def calls(self, key=None):
        with self._lock:
            return sum(n for (_, k), n in self._calls.items() if key is None or k == key)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            doc = json.loads(body)
            key = doc.get("Name") or doc.get("SecretId")
        except (ValueError, AttributeError):
            key = None
        self.server.record(self.headers.get("X-Amz-Target", ""), key)
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, format, *args):
        pass


# ------------------------------------------------------------ the servers under test


LAYER_NAME = "parameters-secrets-extension"


class Launcher:
    """Starts the extension and the floor as separate processes and cleans them up."""

    def __init__(self, python, extension, stand_in_floor, logdir):
        self.python = python
        self.extension = extension
        self.stand_in_floor = stand_in_floor  # dev mode: the floor plays the extension
        self.logdir = logdir
        self.body_size = 64  # the floor's body size; set once the extension's answer is known
        self.procs = []
        self.layer_dir = None  # opt/<name> of an unpacked layer, made on first use

    def extension_env(self, port, endpoint):
        # Built from scratch: nothing from the caller's AWS set-up (profiles, real
        # endpoints) may leak in, and no AWS_LAMBDA_RUNTIME_API: standalone mode.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_SESSION_TOKEN": TOKEN,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
            "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
            "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn",
        }

    def _spawn(self, argv, env, name, cwd=ROOT):
        logfile = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, cwd=cwd
        )
        logfile.close()
        proc.bench_log = logfile.name
        self.procs.append(proc)
        return proc

    def prepare_layer(self):
        """/opt/<name> as build_layer.sh makes it: extension.py and its hash-checked .pyc."""
        if self.layer_dir is None:
            layer_dir = Path(self.logdir) / "opt" / LAYER_NAME
            (layer_dir / "__pycache__").mkdir(parents=True)
            shutil.copyfile(self.extension, layer_dir / "extension.py")
            code = ("import importlib.util, py_compile, sys; py_compile.compile(sys.argv[1], "
                    "cfile=importlib.util.cache_from_source(sys.argv[1]), dfile='extension.py', doraise=True, "
                    "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)")
            subprocess.run([self.python, "-I", "-S", "-c", code, str(layer_dir / "extension.py")], check=True)
            self.layer_dir = layer_dir
        return self.layer_dir

    def extension_argv(self, port, from_source=False):
        """The extension as the layer's bootstrap execs it (-m: from its cached bytecode), or,
        for information, as a script compiled from source at every start."""
        if self.stand_in_floor:
            return self.floor_argv(port), ROOT
        if from_source:
            return [self.python, "-S", str(self.extension)], ROOT
        return [self.python, "-E", "-s", "-S", "-u", "-m", "extension", LAYER_NAME], self.prepare_layer()

    def floor_argv(self, port):
        return [self.python, "-S", str(FLOOR_SCRIPT), str(port), str(self.body_size)]

    def start_extension(self, endpoint, port=None, from_source=False):
        port = port or free_port()
        argv, cwd = self.extension_argv(port, from_source)
        return self._spawn(argv, self.extension_env(port, endpoint), "extension", cwd), port

    def start_floor(self, port=None):
        port = port or free_port()
        return self._spawn(self.floor_argv(port), {"PATH": os.environ.get("PATH", "")}, "floor"), port

    def stop(self, proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in list(self.procs):
            self.stop(proc)


def log_tail(proc, lines=20):
    try:
        with open(proc.bench_log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_for_ping(proc, port, timeout_s=15.0):
    """Poll GET /ping until 200; return the perf_counter time of the first 200."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/ping")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return time.perf_counter()
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log_tail(proc)}")
        time.sleep(0.001)
    raise RuntimeError(f"{proc.args} did not answer /ping within {timeout_s} s:\n{log_tail(proc)}")


# ------------------------------------------------------------------------- clients


def documented_client_get(url):
    """The documented client example (docs/http-api.md): a new urllib connection per request."""
    req = urllib.request.Request(url)
    req.add_header(TOKEN_HEADER, TOKEN)
    with urllib.request.urlopen(req, timeout=10) as response:
        return response.status, response.headers.get(CACHE_HEADER), response.read()


class KeepAliveClient:
    """One persistent http.client connection, reused for every request."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.headers = {TOKEN_HEADER: TOKEN}

    def get(self, path):
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.getheader(CACHE_HEADER), response.read()

    def close(self):
        self.conn.close()


def timed_requests(call, count):
    """Run call() count times; return latencies in ms and the answers that were not 200 / hit."""
    return timed_interleaved({"only": call}, count)["only"]


def timed_interleaved(calls, count):
    """Run each of calls (name -> call) count times, alternating request by request (and
    swapping the order every round), so that both sides meet the same bursts of noise
    from other tenants of the machine. Returns name -> (latencies in ms, not-ok answers)."""
    samples = {name: [] for name in calls}
    not_ok = {name: collections.Counter() for name in calls}
    order = list(calls)
    for _ in range(count):
        for name in order:
            start = time.perf_counter()
            status, cache, _body = calls[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
            if status != 200:
                not_ok[name][f"status {status}"] += 1
            elif cache is not None and cache != "hit":
                not_ok[name][f"cache {cache}"] += 1
        order.reverse()
    return {name: (samples[name], dict(not_ok[name])) for name in calls}


# -------------------------------------------------------------------- measurements


def measure_latency(ext_port, floor_port, settings):
    """Hit latency and the floor: both client styles, extension and floor interleaved."""
    # 'localhost' as in the documented example. Here it resolves to 127.0.0.1 only; where it
    # resolves to ::1 first, both the extension and the floor answer there too.
    urls = {
        "extension": f"http://localhost:{ext_port}{PARAM_PATH}",
        "floor": f"http://localhost:{floor_port}{PARAM_PATH}",
    }
    keepalive = {"extension": KeepAliveClient(ext_port), "floor": KeepAliveClient(floor_port)}
    styles = {
        "new_connection": {who: (lambda who=who: documented_client_get(urls[who])) for who in urls},
        "keep_alive": {who: (lambda who=who: keepalive[who].get(PARAM_PATH)) for who in urls},
    }
    result = {}
    blocks = settings.latency_blocks
    try:
        for style, calls in styles.items():
            timed_interleaved(calls, settings.latency_warmup)
            samples = {who: [] for who in calls}
            block_p99 = {who: [] for who in calls}
            not_ok = {who: collections.Counter() for who in calls}
            for _ in range(blocks):
                for who, (s, bad) in timed_interleaved(calls, settings.latency_requests // blocks).items():
                    samples[who].extend(s)
                    block_p99[who].append(percentile(s, 0.99))
                    not_ok[who].update(bad)
            # A burst from another tenant lands in one block; the median block's p99 is
            # the server's own tail, the overall p99 and max are shown beside it.
            result[style] = {
                who: dict(summarize(samples[who]), p99_block_median_ms=statistics.median(block_p99[who]),
                          not_ok=dict(not_ok[who]))
                for who in calls
            }
        # A delayed-ACK stall recurs; a scheduling hiccup from another process does not.
        # So a keep-alive request over 40 ms is checked with a second pass of the same size.
        ext = result["keep_alive"]["extension"]
        if ext["over_40ms"]:
            again = timed_interleaved(styles["keep_alive"], settings.latency_requests)
            ext["over_40ms_confirmation_pass"] = sum(1 for x in again["extension"][0] if x > STALL_MS)
            ext["floor_over_40ms_confirmation_pass"] = sum(1 for x in again["floor"][0] if x > STALL_MS)
    finally:
        for client in keepalive.values():
            client.close()
    result["blocks"] = blocks
    # A secret hit takes the same path; shown for information only.
    secret_client = KeepAliveClient(ext_port)
    try:
        timed_requests(lambda: secret_client.get(SECRET_PATH), settings.latency_warmup)
        s, bad = timed_requests(lambda: secret_client.get(SECRET_PATH), settings.latency_requests // 4)
        result["secret_keep_alive"] = dict(summarize(s), not_ok=bad)
    finally:
        secret_client.close()
    return result


def measure_boto3(moto_endpoint, ext_port, settings):
    """boto3 against the extension: get_parameter against the same moto server (client
    created once), in blocks alternating with blocks of cache hits on the extension (both
    client styles), so that the speed-up compares figures taken under the same load.
    Blocks, not single calls: moto runs in this process, and its request thread still
    holds the GIL for a moment after answering, which would slow the extension request
    timed right after."""
    ssm = aws_client("ssm", moto_endpoint)
    keepalive = KeepAliveClient(ext_port)
    url = f"http://localhost:{ext_port}{PARAM_PATH}"

    def boto3_call():
        ssm.get_parameter(Name=PARAM)
        return 200, None, b""

    calls = {
        "boto3": boto3_call,
        "extension_keep_alive": lambda: keepalive.get(PARAM_PATH),
        "extension_new_connection": lambda: documented_client_get(url),
    }
    samples = {who: [] for who in calls}
    not_ok = {who: collections.Counter() for who in calls}
    block = 20  # calls per block: the first after a switch may be slower, the median is not
    try:
        for call in calls.values():
            timed_requests(call, 10)
        for _ in range(max(1, settings.boto3_calls // block)):
            for who, call in calls.items():
                s, bad = timed_requests(call, block)
                samples[who].extend(s)
                not_ok[who].update(bad)
                time.sleep(0.01)  # let moto's threads settle before the next block
    finally:
        keepalive.close()
    return {who: dict(summarize(samples[who]), not_ok=dict(not_ok[who])) for who in calls}


BOTO3_FIRST_VALUE = f"""
import boto3
boto3.client("ssm").get_parameter(Name={PARAM!r})["Parameter"]["Value"]
"""

# The documented client example, unchanged but for the port and the parameter name.
URLLIB_FIRST_VALUE = """
import urllib.request
import os
import json
req = urllib.request.Request('http://localhost:' + os.environ['BENCH_PORT'] + 'PARAM_PATH')
req.add_header('X-Aws-Parameters-Secrets-Token', os.environ.get('AWS_SESSION_TOKEN'))
config = urllib.request.urlopen(req).read()
json.loads(config)
""".replace("PARAM_PATH", PARAM_PATH)


def measure_first_value(moto_endpoint, ext_port, settings):
    """First value in a fresh process: boto3 to moto vs urllib to the extension.

    Both run with this benchmark's own interpreter and flags (site enabled: boto3 lives
    in site-packages), so the difference is the work each does.
    """
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    boto_env = dict(
        base_env,
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,  # botocore reads this one
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    urllib_env = dict(base_env, AWS_SESSION_TOKEN=TOKEN, BENCH_PORT=str(ext_port))
    runs = {"boto3": [], "urllib_extension": []}
    jobs = {"boto3": (BOTO3_FIRST_VALUE, boto_env), "urllib_extension": (URLLIB_FIRST_VALUE, urllib_env)}
    for _ in range(settings.fresh_process_runs):
        for name, (code, env) in jobs.items():
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
            )
            elapsed = (time.perf_counter() - start) * 1000.0
            if done.returncode != 0:
                raise RuntimeError(f"fresh-process {name} failed:\n{done.stderr[-2000:]}")
            runs[name].append(elapsed)
    return {name: {"median_ms": statistics.median(v), "runs_ms": v} for name, v in runs.items()}


# A load client: one process, one keep-alive connection per server, reused for every
# window. The driver writes "port start end" (wall-clock times) on stdin; the client
# sends one untimed request on that server's connection, waits for start, counts the
# requests it completes until end, and answers "count not_200 late".
THROUGHPUT_CLIENT = """
import http.client, os, sys, time
headers = {"X-Aws-Parameters-Secrets-Token": os.environ["BENCH_TOKEN"]}
path = sys.argv[1]
conns = {}
def once(conn):
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status
for line in sys.stdin:
    port, start, end = line.split()
    port, start, end = int(port), float(start), float(end)
    conn = conns.get(port) or conns.setdefault(port, http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    once(conn)
    late = time.time() > start
    time.sleep(max(0.0, start - time.time()))
    count = bad = 0
    while time.time() < end:
        if once(conn) != 200:
            bad += 1
        count += 1
    print(count, bad, int(late), flush=True)
"""


def measure_throughput(python, ext_port, floor_port, settings):
    """Throughput: requests/s summed over 8 client processes, each with its own keep-alive
    connection to each server; short windows alternate between the extension and the
    floor. Other tenants of a shared machine steal CPU in bursts that can flatter either
    side's best window, so the verdict is the median of the ratios of adjacent windows;
    the rates shown are each side's mean over its windows.
    """
    env = {"PATH": os.environ.get("PATH", ""), "BENCH_TOKEN": TOKEN}
    clients = [
        subprocess.Popen(
            [python, "-S", "-c", THROUGHPUT_CLIENT, PARAM_PATH],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        for _ in range(settings.throughput_clients)
    ]

    def window(port, seconds=settings.throughput_seconds):
        start = time.time() + 0.15  # time to read the order and send the untimed request
        end = start + seconds
        for client in clients:
            client.stdin.write(f"{port} {start!r} {end!r}\n")
        total = bad = late = 0
        for client in clients:
            answer = client.stdout.readline()
            if not answer:
                raise RuntimeError("a throughput client died (is the server still up?)")
            count, nbad, nlate = (int(x) for x in answer.split())
            total, bad, late = total + count, bad + nbad, late + nlate
        return {"rps": total / seconds, "not_200": bad, "late_clients": late}

    runs = {"extension": [], "floor": []}
    ports = {"extension": ext_port, "floor": floor_port}
    try:
        for port in ports.values():  # untimed: the clients start up and connect
            window(port, 0.2)
        for i in range(settings.throughput_rounds):
            order = ("extension", "floor") if i % 2 == 0 else ("floor", "extension")
            for who in order:
                runs[who].append(window(ports[who]))
    finally:
        for client in clients:
            client.stdin.close()
        for client in clients:
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
    pair_ratios = [e["rps"] / f["rps"] for e, f in zip(runs["extension"], runs["floor"])]
    result = {"pair_ratios": pair_ratios, "window_s": settings.throughput_seconds}
    result["ratio"] = statistics.median(pair_ratios)
    for who, windows in runs.items():
        result[who] = {
            "rps": statistics.mean(w["rps"] for w in windows),
            "best_rps": max(w["rps"] for w in windows),
            "all_rps": [w["rps"] for w in windows],
            "not_200": sum(w["not_200"] for w in windows),
            "late_clients": sum(w["late_clients"] for w in windows),
        }
    return result


def measure_cold_start(launcher, endpoint, settings):
    """Cold start and idle memory: exec to first 200 on /ping, then VmRSS; alternating, medians.

    The extension starts as the layer's bootstrap execs it (`python -E -s -S -u -m extension`
    in /opt/<name>, loading the hash-checked .pyc that build_layer.sh ships); for
    information it is also started as a script (`python -S extension.py`), which Python
    compiles from source at every start because it never caches a __main__ script's bytecode.
    """
    kinds = ["extension", "floor"]
    if not launcher.stand_in_floor:
        kinds.append("extension_from_source")
    times = {who: [] for who in kinds + ["python_S_pass"]}
    rss = {who: [] for who in kinds}
    stops = []  # ms from SIGTERM to exit, the extension with one idle keep-alive connection
    for i in range(settings.cold_start_runs):
        for who in kinds if i % 2 == 0 else kinds[::-1]:
            port = free_port()
            start = time.perf_counter()
            if who == "floor":
                proc, _ = launcher.start_floor(port)
            else:
                proc, _ = launcher.start_extension(endpoint, port, from_source=(who != "extension"))
            try:
                ready = wait_for_ping(proc, port)
                times[who].append((ready - start) * 1000.0)
                rss[who].append(rss_mib(proc.pid))
                if who == "extension":
                    stops.append(time_stop(proc, port))
            finally:
                launcher.stop(proc)
        start = time.perf_counter()
        subprocess.run([launcher.python, "-S", "-c", "pass"], check=True)
        times["python_S_pass"].append((time.perf_counter() - start) * 1000.0)
    return {
        "stop_ms": statistics.median(stops),
        "stop_runs_ms": stops,
        "start_ms": {who: statistics.median(v) for who, v in times.items()},
        "start_runs_ms": times,
        "idle_rss_mib": {who: statistics.median(v) for who, v in rss.items()},
        "idle_rss_runs_mib": rss,
    }


def time_stop(proc, port):
    """ms from SIGTERM to the process's exit, with nothing in flight and one idle
    keep-alive connection open (as a function that keeps its connection leaves it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/ping")
    conn.getresponse().read()
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(5)
    elapsed = (time.perf_counter() - start) * 1000.0
    conn.close()
    return elapsed


def measure_filled_memory(launcher, moto_endpoint, settings):
    """Memory with values cached: RSS of one extension idle, then with fill_count 4 KB values."""
    proc, port = launcher.start_extension(moto_endpoint)
    try:
        wait_for_ping(proc, port)
        idle = rss_mib(proc.pid)

        def fetch_all(indexes):
            client = KeepAliveClient(port)
            outcome = collections.Counter()
            try:
                for i in indexes:
                    status, cache, _ = client.get(f"/systemsmanager/parameters/get?name={FILL_PREFIX}{i:04d}")
                    outcome[f"{status} {cache}"] += 1
            finally:
                client.close()
            return outcome

        def fetch_in_parallel(workers=4):
            chunks = [range(w, settings.fill_count, workers) for w in range(workers)]
            with ThreadPoolExecutor(workers) as pool:
                return sum(pool.map(fetch_all, chunks), collections.Counter())

        first_pass = fetch_in_parallel()
        # Read everything again: the figure means something only if the values stayed cached.
        second_pass = fetch_in_parallel()
        filled = rss_mib(proc.pid)
    finally:
        launcher.stop(proc)
    return {
        "idle_rss_mib": idle,
        "filled_rss_mib": filled,
        "values": settings.fill_count,
        "first_pass": dict(first_pass),
        "second_pass": dict(second_pass),
    }


def measure_upstream_economy(ext_port, proxy, settings):
    """Upstream economy: AWS calls for 64 concurrent cold requests of one key, and for 1,000 requests in the TTL."""
    path = f"/systemsmanager/parameters/get?name={COLD_PARAM}"
    n = settings.concurrent_cold
    clients = [KeepAliveClient(ext_port) for _ in range(n)]
    for client in clients:
        client.conn.connect()  # connected before the barrier: the requests leave together
    barrier = threading.Barrier(n)
    outcome = collections.Counter()
    lock = threading.Lock()

    def one(client):
        barrier.wait()
        try:
            status, cache, _ = client.get(path)
            key = f"{status} {cache}"
        except OSError as exc:
            key = type(exc).__name__
        with lock:
            outcome[key] += 1

    proxy.reset()
    proxy.delay_s = 0.2  # the first fetch is still in flight when the other 63 arrive
    started = time.perf_counter()
    try:
        threads = [threading.Thread(target=one, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    finally:
        proxy.delay_s = 0.0
        for client in clients:
            client.close()
    cold_calls = proxy.calls(COLD_PARAM)

    proxy.reset()
    client = KeepAliveClient(ext_port)
    ttl_outcome = collections.Counter()
    try:
        for _ in range(settings.ttl_requests):
            status, cache, _ = client.get(f"/systemsmanager/parameters/get?name={TTL_PARAM}")
            ttl_outcome[f"{status} {cache}"] += 1
    finally:
        client.close()
    return {
        "concurrent_cold": {"requests": n, "aws_calls": cold_calls, "answers": dict(outcome),
                            "elapsed_ms": elapsed_ms, "upstream_delay_ms": 200},
        "within_ttl": {
            "requests": settings.ttl_requests,
            "aws_calls": proxy.calls(TTL_PARAM),
            "answers": dict(ttl_outcome),
        },
    }


BATCH_NAMES = 25  # get-multiple: three GetParameters calls on a miss (10 names per call)
BATCH_SECRETS = 10
BATCH_VALUE = "v" * 16


def measure_batch_routes(ext_port, moto_endpoint, settings):
    """Batch routes: a hit on each batch route (get-multiple, get-by-path, batch-get) against a
    /get hit whose answer has the same size, keep-alive, interleaved request by request;
    jsonKey and format=raw against a plain /get of the same secret, for information."""
    ssm = aws_client("ssm", moto_endpoint)
    sm = aws_client("secretsmanager", moto_endpoint)
    names = [f"/bench/many/p{i:02d}" for i in range(BATCH_NAMES)]
    for i, name in enumerate(names):
        ssm.put_parameter(Name=name, Value=BATCH_VALUE, Type="String")
        ssm.put_parameter(Name=f"/bench/tree/p{i:02d}", Value=BATCH_VALUE, Type="String")
    secret_ids = [f"bench/many/s{i:02d}" for i in range(BATCH_SECRETS)]
    for secret_id in secret_ids:
        sm.create_secret(Name=secret_id, SecretString=json.dumps({"password": "p" * 64}))
    batch_paths = {
        "get-multiple": f"/systemsmanager/parameters/get-multiple?names={','.join(names)}",
        "get-by-path": "/systemsmanager/parameters/get-by-path?path=/bench/tree/",
        "batch-get": f"/secretsmanager/batch-get?secretIds={','.join(secret_ids)}",
    }
    client = KeepAliveClient(ext_port)
    result = {}
    try:
        for route, path in batch_paths.items():
            status, _, body = client.get(path)
            if status != 200:
                raise RuntimeError(f"extension answered {status} for {route}: {body[:300]!r}")
            size = len(body)
            # A /get answer of the same size: the overhead of the answer around the value
            # is measured on a small value under a name of the same length, then filled.
            if route == "batch-get":
                probe, reference = "bench/ref/batch-get-0", "bench/ref/batch-get-1"
                sm.create_secret(Name=probe, SecretString="x")
                overhead = len(client.get(f"/secretsmanager/get?secretId={probe}")[2]) - 1
                sm.create_secret(Name=reference, SecretString="x" * (size - overhead))
                reference_path = f"/secretsmanager/get?secretId={reference}"
            else:
                probe, reference = f"/bench/ref/{route}-0", f"/bench/ref/{route}-1"
                ssm.put_parameter(Name=probe, Value="x", Type="String")
                overhead = len(client.get(f"/systemsmanager/parameters/get?name={probe}")[2]) - 1
                ssm.put_parameter(Name=reference, Value="x" * (size - overhead), Type="String", Tier="Advanced")
                reference_path = f"/systemsmanager/parameters/get?name={reference}"
            reference_size = len(client.get(reference_path)[2])
            calls = {"route": lambda path=path: client.get(path),
                     "get": lambda reference_path=reference_path: client.get(reference_path)}
            timed_interleaved(calls, settings.latency_warmup)
            measured = timed_interleaved(calls, settings.latency_requests // 2)
            result[route] = {"bytes": size, "reference_bytes": reference_size,
                             "route": dict(summarize(measured["route"][0]), not_ok=measured["route"][1]),
                             "get": dict(summarize(measured["get"][0]), not_ok=measured["get"][1])}
        plain = f"/secretsmanager/get?secretId={secret_ids[0]}"
        for label, path in (("jsonKey", plain + "&jsonKey=password"), ("format=raw", plain + "&format=raw"),
                            ("jsonKey&format=raw", plain + "&jsonKey=password&format=raw")):
            calls = {"route": lambda path=path: client.get(path), "get": lambda: client.get(plain)}
            timed_interleaved(calls, settings.latency_warmup)
            measured = timed_interleaved(calls, settings.latency_requests // 4)
            result[label] = {"route": dict(summarize(measured["route"][0]), not_ok=measured["route"][1]),
                             "get": dict(summarize(measured["get"][0]), not_ok=measured["get"][1])}
    finally:
        client.close()
    return result


# ------------------------------------------------------------------ verdicts, table


def row(figure, value, reference, ratio, target, passed, detail=""):
    return {
        "figure": figure,
        "extension": value,
        "reference": reference,
        "ratio": ratio,
        "target": target,
        "result": "info" if passed is None else ("pass" if passed else "miss"),
        "detail": detail,
    }


def build_rows(r):
    lat, tp, cold, fill, econ = r["latency"], r["throughput"], r["cold_start"], r["memory_filled"], r["economy"]
    ka, nc = lat["keep_alive"], lat["new_connection"]
    rows = []

    for style, label, limit in ((ka, "keep-alive", 1.25), (nc, "new connection (urllib, localhost)", 1.2)):
        ext, floor = style["extension"], style["floor"]
        ratio = ext["p50_ms"] / floor["p50_ms"]
        # A figure measured on errors or misses would mean nothing: say so, and miss.
        valid = not ext["not_ok"]
        rows.append(row(f"hit p50, {label}", f"{ext['p50_ms']:.3f} ms", f"floor {floor['p50_ms']:.3f} ms",
                        f"{ratio:.2f}x", f"<= {limit}x floor", valid and ratio <= limit,
                        "" if valid else f"INVALID: answers that were not a 200 hit: {ext['not_ok']}"))

    for style, label, judged in ((ka, "keep-alive", True), (nc, "new connection", False)):
        ext, floor = style["extension"], style["floor"]
        ratio = ext["p99_block_median_ms"] / floor["p99_block_median_ms"]
        # A stall: over 40 ms in the measured pass and again in the confirmation pass.
        stalled = ext["over_40ms"] > 0 and ext.get("over_40ms_confirmation_pass", 0) > 0
        confirmation = ""
        if "over_40ms_confirmation_pass" in ext:
            confirmation = (f"; confirmation pass of {ext['n']}: {ext['over_40ms_confirmation_pass']} over 40 ms "
                            f"(floor {ext['floor_over_40ms_confirmation_pass']})")
        rows.append(row(f"hit p99, {label}", f"{ext['p99_block_median_ms']:.3f} ms",
                        f"floor {floor['p99_block_median_ms']:.3f} ms", f"{ratio:.2f}x",
                        "<= 2x floor, 0 over 40 ms" if judged else "-",
                        (ratio <= 2.0 and not stalled) if judged else None,
                        f"p99 of the median block of {lat['blocks']}; over all {ext['n']} requests: "
                        f"p99 {ext['p99_ms']:.2f} ms, max {ext['max_ms']:.1f} ms, {ext['over_40ms']} over 40 ms "
                        f"(floor: p99 {floor['p99_ms']:.2f} ms, max {floor['max_ms']:.1f} ms, "
                        f"{floor['over_40ms']} over 40 ms){confirmation}"))

    ratio = tp["ratio"]
    rows.append(row("throughput, 8 keep-alive clients", f"{tp['extension']['rps']:.0f} req/s",
                    f"floor {tp['floor']['rps']:.0f} req/s", f"{ratio:.2f}x", ">= 0.8x floor", ratio >= 0.8,
                    f"rates: mean over all windows; ratio: median of the per-pair ratios over "
                    f"{len(tp['pair_ratios'])} pairs of alternating {tp['window_s']} s windows "
                    f"({[round(x, 2) for x in tp['pair_ratios']]}); best window ext {tp['extension']['best_rps']:.0f}, "
                    f"floor {tp['floor']['best_rps']:.0f}; "
                    f"windows ext {[round(x) for x in tp['extension']['all_rps']]}, "
                    f"floor {[round(x) for x in tp['floor']['all_rps']]}; "
                    f"non-200: ext {tp['extension']['not_200']}, floor {tp['floor']['not_200']}"
                    + (f"; clients late for a window: ext {tp['extension']['late_clients']}, "
                       f"floor {tp['floor']['late_clients']}"
                       if tp["extension"]["late_clients"] or tp["floor"]["late_clients"] else "")))

    b3 = r["boto3"]
    boto_p50 = b3["boto3"]["p50_ms"]
    for who, label, judged in (("extension_keep_alive", "keep-alive", True),
                               ("extension_new_connection", "documented client", False)):
        ext_p50 = b3[who]["p50_ms"]
        speedup = boto_p50 / ext_p50
        rows.append(row(f"hit p50 ({label}) vs boto3 get_parameter", f"{ext_p50:.3f} ms",
                        f"boto3 {boto_p50:.3f} ms", f"{speedup:.1f}x faster",
                        ">= 15x faster" if judged else "-", speedup >= 15 if judged else None,
                        f"{b3['boto3']['n']} calls each, in alternating blocks" if judged else ""))

    fv = r["first_value"]
    rows.append(row("first value in a fresh process", f"urllib->ext {fv['urllib_extension']['median_ms']:.0f} ms",
                    f"boto3 {fv['boto3']['median_ms']:.0f} ms",
                    f"{fv['boto3']['median_ms'] / fv['urllib_extension']['median_ms']:.1f}x faster", "-", None))

    s = cold["start_ms"]
    ratio = s["extension"] / s["floor"]
    rows.append(row("cold start, exec to first /ping 200", f"{s['extension']:.0f} ms", f"floor {s['floor']:.0f} ms",
                    f"{ratio:.2f}x", "<= 1.3x floor", ratio <= 1.3,
                    f"python3 -S -c pass: {s['python_S_pass']:.0f} ms"))

    stop = cold["stop_ms"]
    rows.append(row("stop, SIGTERM to exit, nothing in flight", f"{stop:.1f} ms", "-", "-", "<= 50 ms",
                    stop <= 50.0, f"one idle keep-alive connection open; runs: "
                                  f"{', '.join(f'{v:.1f}' for v in cold['stop_runs_ms'])} ms"))

    if "extension_from_source" in s:
        rows.append(row("cold start, extension.py run as a script", f"{s['extension_from_source']:.0f} ms",
                        f"floor {s['floor']:.0f} ms", f"{s['extension_from_source'] / s['floor']:.2f}x", "-", None,
                        f"python -S extension.py: compiled from source at every start; "
                        f"idle RSS {cold['idle_rss_mib']['extension_from_source']:.1f} MiB"))

    m = cold["idle_rss_mib"]
    delta = m["extension"] - m["floor"]
    rows.append(row("resident memory, idle", f"{m['extension']:.1f} MiB", f"floor {m['floor']:.1f} MiB",
                    f"{delta:+.2f} MiB", "<= floor + 6 MiB", delta <= 6.0))

    delta = fill["filled_rss_mib"] - fill["idle_rss_mib"]
    second = fill["second_pass"]
    rows.append(row(f"resident memory, {fill['values']} x 4 KB cached", f"{fill['filled_rss_mib']:.1f} MiB",
                    f"idle {fill['idle_rss_mib']:.1f} MiB", f"{delta:+.2f} MiB", "<= idle + 10 MiB", delta <= 10.0,
                    f"re-read answers: {second}"))

    cc, tt = econ["concurrent_cold"], econ["within_ttl"]
    rows.append(row(f"AWS calls, {cc['requests']} concurrent cold requests", str(cc["aws_calls"]), "-", "-", "1",
                    cc["aws_calls"] == 1,
                    f"answers: {cc['answers']}; all answered in {cc['elapsed_ms']:.0f} ms "
                    f"(upstream held {cc['upstream_delay_ms']} ms by the proxy so that they overlap)"))
    rows.append(row(f"AWS calls, {tt['requests']} requests within the TTL", str(tt["aws_calls"]), "-", "-", "1",
                    tt["aws_calls"] == 1, f"answers: {tt['answers']}"))

    if "lambda_cold_start" in r:
        # bench/coldstart.py's rows: (figure, value, reference, note, ratio, target, passed)
        for figure, value, reference, note, ratio, target, passed in coldstart.report(r["lambda_cold_start"]):
            rows.append(row(f"Lambda cold start: {figure}", value, reference, ratio, target, passed, note))

    if "refresh_ahead" in r:
        # bench/refresh_ahead.py's rows, one per setting: (figure, value, reference, note, ratio, target, passed)
        for figure, value, reference, note, ratio, target, passed in refresh_ahead.report(r["refresh_ahead"]):
            rows.append(row(f"refresh ahead: {figure}", value, reference, ratio, target, passed, note))

    if "fleet" in r:
        # bench/fleet.py's rows, one per scenario: (figure, value, reference, note, ratio, target, passed)
        for figure, value, reference, note, ratio, target, passed in fleet.report(r["fleet"]):
            rows.append(row(f"fleet: {figure}", value, reference, ratio, target, passed, note))

    sk = lat["secret_keep_alive"]
    rows.append(row("secret hit p50, keep-alive", f"{sk['p50_ms']:.3f} ms", "-", "-", "-", None,
                    f"p99 {sk['p99_ms']:.3f} ms"))

    batch = r["batch_routes"]
    for route, items in (("get-multiple", f"{BATCH_NAMES} names"), ("get-by-path", f"{BATCH_NAMES} parameters"),
                         ("batch-get", f"{BATCH_SECRETS} secrets")):
        b = batch[route]
        ratio = b["route"]["p50_ms"] / b["get"]["p50_ms"]
        valid = not b["route"]["not_ok"] and not b["get"]["not_ok"]
        rows.append(row(f"{route} hit p50, {items}, keep-alive", f"{b['route']['p50_ms']:.3f} ms",
                        f"/get {b['get']['p50_ms']:.3f} ms", f"{ratio:.2f}x", "<= 1.5x /get of the same size",
                        valid and ratio <= 1.5,
                        f"answers of {b['bytes']} bytes against a /get answer of {b['reference_bytes']} bytes; "
                        f"p99 {b['route']['p99_ms']:.3f} ms (/get {b['get']['p99_ms']:.3f} ms)"
                        + ("" if valid else f"; INVALID: not a 200 hit: {b['route']['not_ok']} {b['get']['not_ok']}")))
    for label in ("jsonKey", "format=raw", "jsonKey&format=raw"):
        b = batch[label]
        rows.append(row(f"secret {label} hit p50, keep-alive", f"{b['route']['p50_ms']:.3f} ms",
                        f"/get {b['get']['p50_ms']:.3f} ms", f"{b['route']['p50_ms'] / b['get']['p50_ms']:.2f}x",
                        "-", None, "" if not (b["route"]["not_ok"] or b["get"]["not_ok"])
                        else f"INVALID: not a 200 hit: {b['route']['not_ok']} {b['get']['not_ok']}"))
    return rows


def print_table(rows, out=sys.stdout):
    columns = ("figure", "extension", "reference", "ratio", "target", "result")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    print(line, file=out)
    print("  ".join("-" * widths[c] for c in columns), file=out)
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns), file=out)
    notes = [f"- {r['figure']}: {r['detail']}" for r in rows if r["detail"]]
    if notes:
        print("\nnotes:", file=out)
        print("\n".join(notes), file=out)


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--quick", action="store_true",
                   help="fewer samples, a 3 s refresh-ahead loop and a fleet of 30: about 55 s instead of 95")
    p.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    p.add_argument("--no-refresh-ahead", action="store_true",
                   help="skip the refresh-ahead section (bench/refresh_ahead.py: one key read across 2 s TTL "
                        "windows with REFRESH_AHEAD 0 and 80, about 15 s)")
    p.add_argument("--no-fleet", action="store_true",
                   help="skip the fleet section (bench/fleet.py: N extensions at once against a throttled "
                        "Parameter Store, 30-60 s)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the extension, the floor and the load clients (run with -S)")
    p.add_argument("--extension", default=str(ROOT / "extension.py"), help="path of extension.py")
    p.add_argument("--stand-in-floor", action="store_true",
                   help="development only: run the floor server in place of the extension")
    return p.parse_args(argv)


def run(args):
    settings = Settings(args.quick)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)  # urllib must talk to loopback directly
    if not args.stand_in_floor and not Path(args.extension).is_file():
        raise SystemExit(f"bench: {args.extension} not found (use --stand-in-floor to try the benchmark itself)")
    began = time.perf_counter()
    results = {"machine": machine_description(), "quick": args.quick, "stand_in_floor": args.stand_in_floor}
    moto, moto_port = start_moto()
    proxy = CountingProxy(moto_port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    moto_endpoint = f"http://127.0.0.1:{moto_port}"
    proxy_endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="bench-") as logdir:
        launcher = Launcher(args.python, args.extension, args.stand_in_floor, logdir)
        try:
            log(f"seeding moto ({settings.fill_count} x 4 KB parameters)")
            seed(moto_endpoint, settings.fill_count)

            log("starting the extension (through the counting proxy) and the floor")
            ext, ext_port = launcher.start_extension(proxy_endpoint)
            wait_for_ping(ext, ext_port)
            probe = KeepAliveClient(ext_port)
            status, _, body = probe.get(PARAM_PATH)
            probe.close()
            if status != 200:
                raise RuntimeError(f"extension answered {status} for {PARAM}: {body[:300]!r}")
            launcher.body_size = len(body)
            results["answer_bytes"] = len(body)
            floor, floor_port = launcher.start_floor()
            wait_for_ping(floor, floor_port)

            log("hit latency, documented client and keep-alive, extension vs floor")
            results["latency"] = measure_latency(ext_port, floor_port, settings)
            log("boto3 get_parameter to moto, and a first value in a fresh process")
            results["boto3"] = measure_boto3(moto_endpoint, ext_port, settings)
            results["first_value"] = measure_first_value(moto_endpoint, ext_port, settings)
            log("throughput, 8 keep-alive client processes")
            results["throughput"] = measure_throughput(args.python, ext_port, floor_port, settings)
            log("upstream economy")
            results["economy"] = measure_upstream_economy(ext_port, proxy, settings)
            log("batch routes: a hit on each against a /get hit of the same size")
            results["batch_routes"] = measure_batch_routes(ext_port, moto_endpoint, settings)
            launcher.stop(ext)
            launcher.stop(floor)

            log("cold start and idle memory")
            results["cold_start"] = measure_cold_start(launcher, proxy_endpoint, settings)
            log("memory with 1,000 x 4 KB values cached")
            results["memory_filled"] = measure_filled_memory(launcher, moto_endpoint, settings)
            if not args.stand_in_floor:
                log("cold start under a minimal Extensions API, against a minimal Python extension")
                results["lambda_cold_start"] = coldstart.measure(os.path.realpath(args.python), args.extension,
                                                                 settings.lambda_cold_start_runs)
        finally:
            launcher.stop_all()
            proxy.shutdown()
            moto.stop()
    if not (args.no_refresh_ahead or args.stand_in_floor):
        # Once the sections above have stopped (a refresh's latency is a tail figure: nothing
        # else of the benchmark may run beside it), and before the fleet's 60 processes.
        # It has a moto and a forwarder of its own.
        log(f"refresh ahead: one key across {settings.refresh_ahead_seconds:g} s of 2 s TTL windows, "
            "REFRESH_AHEAD 0 and 80")
        results["refresh_ahead"] = refresh_ahead.measure(os.path.realpath(args.python), args.extension,
                                                         seconds=settings.refresh_ahead_seconds)
    if not (args.no_fleet or args.stand_in_floor):
        # Last, once everything above has stopped: 60 processes starting at once would
        # disturb any figure taken beside them. It has a moto and a proxy of its own.
        log(f"fleet: {settings.fleet_n} extensions started at once, {settings.fleet_k} parameters each, "
            f"against a {settings.fleet_rate:g} calls/s throttle")
        results["fleet"] = fleet.measure(os.path.realpath(args.python), args.extension, settings.fleet_n,
                                         settings.fleet_k, settings.fleet_rate)
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    results["rows"] = build_rows(results)
    return results


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = run(args)
    except ImportError as exc:
        print(f"bench: {exc}: it needs boto3 and moto[server]; run it with the dev venv "
              "(python3 tools/dev.py bench, or .venv/bin/python bench/bench.py)", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: could not complete: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(results, sys.stdout, indent=2, default=str)
        print()
    else:
        m = results["machine"]
        print(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['os']}, Python {m['python']}")
        load = max(m["load_average_at_start"], m["load_average_at_end"])
        print(f"load average (1 min): {m['load_average_at_start']:.1f} at start, {m['load_average_at_end']:.1f} at end"
              + (" - BUSY MACHINE: other processes compete for the CPUs; ratios are noisy" if load > m["cpus"] else ""))
        print(f"mode: {'quick' if args.quick else 'full'}; answer {results['answer_bytes']} bytes; "
              f"ran {results['seconds']} s" + ("; STAND-IN: floor plays the extension" if args.stand_in_floor else ""))
        print()
        print_table(results["rows"])
    missed = [r for r in results["rows"] if r["result"] == "miss"]
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
