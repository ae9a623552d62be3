#!/usr/bin/env python3
"""Cold start under a minimal Extensions API: the layer's extension against the plainest
Python extension (bench/minimal_extension.py), and a bare `python3 -E -s -S -c 'import socket'`.

    python3 bench/coldstart.py [--runs N] [--python PATH] [--json]

Lambda starts the function's runtime only once every extension has registered, and INIT
ends once every extension waits in /event/next, so these are the figures that each cold
start pays (docs/design.md, "Cold start"):

- exec to /register: from the exec of the interpreter to Lambda receiving /register;
- exec to first 200: to the first 200 on GET /ping (the layer only: it serves);
- exec to /event/next: to the first /event/next (INIT can end);
- memory: VmRSS when the first /event/next arrives;
- CPU: the process's CPU time (all its threads) by then, from /proc/PID/task/*/schedstat.

Both extensions are started the same way, `python -E -s -S -u -m <module> NAME` from
hash-checked bytecode in a directory of their own, as the layer's bootstrap execs it.
Runs alternate between the three, and medians are reported. Only loopback is used; every
wait is bounded.

With --rie PATH (AWS's Runtime Interface Emulator, not part of the project) the INIT
REPORT durations of a real lifecycle are measured too: nothing in /opt, the layer, the
minimal extension; see --help.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "parameters-secrets-extension"
TOKEN = "cold-start-benchmark-token"
WAIT_SECONDS = 15.0  # any one start that takes longer is a failure, not a figure


class ExtensionsApi(ThreadingHTTPServer):
    """POST /register and GET /event/next, recording when each arrives; /event/next is
    answered with SHUTDOWN once release() is called."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.registered = threading.Event()
        self.waiting = threading.Event()
        self.shutdown_now = threading.Event()
        self.register_at = self.next_at = None
        self.on_next = None  # called with no argument when the first /event/next arrives

    def reset(self, on_next=None):
        self.registered.clear()
        self.waiting.clear()
        self.shutdown_now.clear()
        self.register_at = self.next_at = None
        self.on_next = on_next

    def release(self):
        self.shutdown_now.set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        now = time.perf_counter()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/register"):
            self.server.register_at = now
            self.server.registered.set()
            self._send(200, {"functionName": "bench", "functionVersion": "$LATEST", "handler": "h.h"},
                       (("Lambda-Extension-Identifier", str(uuid.uuid4())),))
        else:
            self._send(202, {"status": "OK"})

    def do_GET(self):
        if self.path.endswith("/event/next"):
            if self.server.next_at is None:
                self.server.next_at = time.perf_counter()
                if self.server.on_next is not None:
                    self.server.on_next()
                self.server.waiting.set()
            self.server.shutdown_now.wait(WAIT_SECONDS)
            self._send(200, {"eventType": "SHUTDOWN", "shutdownReason": "spindown",
                             "deadlineMs": int(time.time() * 1000) + 2000})
        else:
            self._send(404, {})


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_ms(pid):
    """CPU time of every thread of pid so far, in ms (schedstat: nanoseconds), or from
    /proc/PID/stat clock ticks where schedstat is missing."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        return total / 1e6
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def compiled_copy(python, source, directory, module):
    """source as directory/module.py with its hash-checked bytecode, as build_layer.sh ships."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{module}.py"
    shutil.copyfile(source, target)
    code = ("import importlib.util, py_compile, sys; py_compile.compile(sys.argv[1], "
            "cfile=importlib.util.cache_from_source(sys.argv[1]), dfile=sys.argv[2], doraise=True, "
            "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)")
    subprocess.run([python, "-I", "-S", "-c", code, str(target), f"{module}.py"], check=True)
    return directory


def ping_ok(port):
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        connection.request("GET", "/ping")
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    except OSError:
        return False


def one_start(python, kind, directory, api, port):
    """Start one extension and measure it; returns a dict of figures (ms, MiB)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{api.server_address[1]}"}
    module = "minimal_extension" if kind == "minimal" else "extension"
    if kind == "layer":
        # What Lambda gives a function: a session token (the request token), a region,
        # credentials, and (for the benchmark) an endpoint on loopback that is never called.
        env.update({"AWS_SESSION_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "ASIABENCH", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                    "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
                    "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn"})
    figures = {}
    proc_holder = {}

    def at_next():
        pid = proc_holder["proc"].pid
        figures["rss_mib"] = rss_mib(pid)
        figures["cpu_ms"] = cpu_ms(pid)

    api.reset(at_next)
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-E", "-s", "-S", "-u", "-m", module, NAME], cwd=directory, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc_holder["proc"] = proc
    try:
        if kind == "layer":
            deadline = start + WAIT_SECONDS
            while not ping_ok(port):
                if time.perf_counter() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {kind} extension never answered /ping")
                time.sleep(0.001)
            figures["first_200_ms"] = (time.perf_counter() - start) * 1000.0
        if not api.waiting.wait(WAIT_SECONDS):
            raise RuntimeError(f"the {kind} extension never called /event/next")
        figures["register_ms"] = (api.register_at - start) * 1000.0
        figures["next_ms"] = (api.next_at - start) * 1000.0
    finally:
        api.release()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return figures


def bare_python_ms(python):
    start = time.perf_counter()
    subprocess.run([python, "-E", "-s", "-S", "-c", "import socket"], check=True)
    return (time.perf_counter() - start) * 1000.0


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(python, extension, runs):
    """Alternating runs of the layer, the minimal extension and bare Python; medians."""
    with tempfile.TemporaryDirectory(prefix="coldstart-") as work:
        layer_dir = compiled_copy(python, extension, Path(work) / "opt" / NAME, "extension")
        minimal_dir = compiled_copy(python, ROOT / "bench" / "minimal_extension.py", Path(work) / "minimal",
                                    "minimal_extension")
        api = ExtensionsApi()
        threading.Thread(target=api.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        samples = {"layer": [], "minimal": [], "bare": []}
        try:
            for index in range(runs):
                order = ["layer", "minimal", "bare"]
                for kind in order if index % 2 == 0 else order[::-1]:
                    if kind == "bare":
                        samples["bare"].append({"exit_ms": bare_python_ms(python)})
                    else:
                        directory = layer_dir if kind == "layer" else minimal_dir
                        samples[kind].append(one_start(python, kind, directory, api, free_port()))
        finally:
            api.shutdown()
            api.server_close()
    return {kind: {key: statistics.median(run[key] for run in runs_) for key in runs_[0]}
            for kind, runs_ in samples.items()} | {"runs": runs}


def report(result):
    layer, minimal, bare = result["layer"], result["minimal"], result["bare"]
    rows = [
        ("exec to /register", f"{layer['register_ms']:.1f} ms", f"minimal {minimal['register_ms']:.1f} ms",
         f"bare python -c 'import socket': {bare['exit_ms']:.1f} ms",
         f"{layer['register_ms'] / bare['exit_ms']:.2f}x bare", "<= 1.5x bare",
         layer["register_ms"] <= 1.5 * bare["exit_ms"]),
        ("exec to first 200 (/ping)", f"{layer['first_200_ms']:.1f} ms", "-", "", "-", "-", None),
        ("exec to /event/next", f"{layer['next_ms']:.1f} ms", f"minimal {minimal['next_ms']:.1f} ms", "",
         f"{layer['next_ms'] / minimal['next_ms']:.2f}x minimal", "-", None),
        ("memory at /event/next", f"{layer['rss_mib']:.1f} MiB", f"minimal {minimal['rss_mib']:.1f} MiB", "",
         f"{layer['rss_mib'] - minimal['rss_mib']:+.2f} MiB", "<= minimal + 1.5 MiB",
         layer["rss_mib"] <= minimal["rss_mib"] + 1.5),
        ("CPU time to /event/next", f"{layer['cpu_ms']:.1f} ms", f"minimal {minimal['cpu_ms']:.1f} ms", "",
         f"{layer['cpu_ms'] / minimal['cpu_ms']:.2f}x minimal", "reported", None),
    ]
    return rows


def print_rows(rows, runs, out=sys.stdout):
    out.write(f"cold start under a minimal Extensions API, medians of {runs} alternating runs\n")
    for figure, value, reference, note, ratio, target, passed in rows:
        verdict = "info" if passed is None else ("pass" if passed else "miss")
        out.write(f"  {figure:28} {value:>10}  {reference:22} {ratio:18} {target:22} {verdict}\n")
        if note:
            out.write(f"  {'':28} {note}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="alternating runs of each (default 15)")
    parser.add_argument("--python", default=os.path.realpath(sys.executable),
                        help="the interpreter both extensions run on (default: this one, resolved)")
    parser.add_argument("--extension", default=str(ROOT / "extension.py"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.python, args.extension, args.runs)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_rows(report(result), args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
