#!/usr/bin/env python3
"""Refresh-ahead benchmark: one hot key read in a loop across several TTL windows, with
PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD off and on.

    .venv/bin/python bench/refresh_ahead.py [--ttl 1] [--seconds 6] [--interval-ms 5]
                                            [--aws-latency-ms 50] [--ahead 0,80] [--json]

Run it from the repository root with a Python that has boto3 and moto[server] (the
project's dev venv); it is also a section of bench/bench.py. About 15 s with the defaults.

What runs, all on loopback:

- moto (ThreadedMotoServer, in this process), emptied and seeded with one parameter;
- a forwarder (in this process) between the extension and moto that gives every AWS call
  a fixed round trip (--aws-latency-ms), as a Region's would, so that a request which
  waits on AWS stands out from a hit: it passes the call to moto at once and sends the
  answer back that long after the call arrived (later only if moto took longer). It
  records when each call arrived and when its answer left;
- per setting (--ahead, percent of the TTL), a fresh extension (as the layer's bootstrap
  execs it, from hash-checked bytecode; --as-script: `python -S extension.py`) with
  SSM_PARAMETER_STORE_TTL=--ttl and that REFRESH_AHEAD, and a client: a separate clean
  interpreter (`python -S`), so that moto and the forwarder working in this process, GIL
  included, never delay its timings. It reads the key on one keep-alive connection, one
  request every --interval-ms from start to start (a request that ends late is followed
  at once, with no catch-up burst; 0: back to back), for --seconds.

Printed per setting: requests; p50 / p99 / max latency over every request but the first
(the cold miss, which waits on AWS whatever the setting); the p99 of the hits alone; the
answers by X-Parameters-Secrets-Cache; the AWS calls in all, per TTL window elapsed, and
the most in any one window (windows of --ttl seconds counted from the first request);
max / hit p99; the target with pass or miss. The notes add when each call came, the
requests that led them, the answers that waited on AWS and the slow ones (over 2x the
hit p99, and how far from a call), and the extension's shutdown summary. Targets (figures, never asserted by tests):
with refresh ahead on, after the first miss no request waits on AWS (max within 2x the hit
p99, one miss), and after the cold miss at most one AWS call per window; off, behaviour and
call counts as before (one miss, so one call, per expiry: calls = misses, none ahead).
Exit status: 0 when the benchmark ran (even with misses), 2 when it could not run.
"""

import argparse
import bisect
import collections
import http.client
import json
import math
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fleet  # bench/fleet.py, beside this file: moto, ports, the extension's command line

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
REGION = fleet.REGION
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
CACHE_HEADER = "X-Parameters-Secrets-Cache"
SSM_GET = "AmazonSSM.GetParameter"

NAME = "/bench/hot"
# SSM_PARAMETER_STORE_TTL is whole seconds. 2, not 1: refreshes of one key are at most one
# a second, counted from a refresh's start, while a value's TTL counts from its arrival,
# so with a 1 s TTL each refresh ends right at the expiry it should precede (documented in
# docs/configuration.md, "Refresh ahead"; run --ttl 1 to see it).
DEFAULT_TTL = 2
DEFAULT_SECONDS = 8.0
DEFAULT_INTERVAL_MS = 5.0
DEFAULT_LATENCY_MS = 50.0
DEFAULT_AHEAD = (0, 80)

CLIENT_TIMEOUT_S = 10.0  # one request; nothing may hang
SLOW_FACTOR = 2.0  # the target: the slowest request within 2x the hit p99
DRAIN_S = 5.0  # at most this long for a refresh still in flight when the loop ends


_STARTED = time.perf_counter()


def log(message):
    """Progress goes to stderr so that --json keeps stdout clean."""
    print(f"[refresh-ahead {time.perf_counter() - _STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(samples, fraction):
    """Nearest-rank percentile of a non-empty list (bench.py's)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]


# ------------------------------------------------------------------ the forwarder


class LatencyProxy(ThreadingHTTPServer):
    """Every call held latency_s, then forwarded to moto as received; each call kept as
    (arrived, answered, X-Amz-Target, Name, status) on time.monotonic, the clock the client
    process stamps its requests with (CLOCK_MONOTONIC on Linux: one clock for the machine)."""

    daemon_threads = True

    def __init__(self, upstream_port, latency_s):
        super().__init__(("127.0.0.1", 0), _LatencyHandler)
        self.upstream_port = upstream_port
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self.reset()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls
        return conn, addr

    def handle_error(self, request, client_address):
        # A connection the extension closed on stopping is not worth a traceback on
        # stderr; it is counted, and shown when not zero.
        with self._lock:
            self.connection_errors += 1

    def reset(self):
        with self._lock:
            self.calls = []
            self.in_flight = 0
            self.connection_errors = 0

    def begin(self):
        with self._lock:
            self.in_flight += 1

    def done(self, call):
        with self._lock:
            self.in_flight -= 1
            self.calls.append(call)

    def snapshot(self):
        with self._lock:
            return sorted(self.calls, key=lambda call: call["arrived"]), self.in_flight, self.connection_errors


class _LatencyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the extension keeps its connections to AWS alive
    timeout = 120  # idle a TTL or more between calls: closed only long after the run

    def log_message(self, *args):
        pass

    def do_POST(self):
        arrived = time.monotonic()
        self.server.begin()
        call = {"arrived": arrived, "target": self.headers.get("X-Amz-Target", ""), "name": None, "status": 502}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                call["name"] = json.loads(body).get("Name")
            except (ValueError, AttributeError):
                pass
            status, reason, headers, data, _ = fleet.forward_to_moto(self, body)
            # The Region's round trip: the answer leaves latency_s after the call arrived
            # (or when moto has it, if moto took longer). Moto first: its CPU time, this
            # process's and no AWS Region's, then falls at the start of the call and not
            # at the moment the extension takes the answer in.
            time.sleep(max(0.0, arrived + self.server.latency_s - time.monotonic()))
            call["status"] = status
            fleet.answer_from_moto(self, status, reason, headers, data)
        finally:
            call["answered"] = time.monotonic()
            self.server.done(call)

    do_GET = do_POST


# ------------------------------------------------------------------ the client (its own process)


def client_main(argv):
    """The reading loop, run in a clean interpreter: argv is port, path, token, expected
    value, seconds, interval in ms. Prints one JSON list: per request [start on
    time.monotonic, latency in ms, status, cache header, the value was right]."""
    port, path, token, expected = int(argv[0]), argv[1], argv[2], argv[3].encode()
    seconds, interval = float(argv[4]), float(argv[5]) / 1000.0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    conn.connect()  # before the loop: the first request is then timed like the others
    headers = {TOKEN_HEADER: token}
    samples = []
    first = None
    try:
        while True:
            start = time.monotonic()
            if first is None:
                first = start
            elif start - first >= seconds:
                break
            began = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            elapsed_ms = (time.perf_counter() - began) * 1000.0
            samples.append([start, elapsed_ms, response.status, response.getheader(CACHE_HEADER),
                            expected in body])
            # Start to start: a request that ended late is followed at once, never by a burst.
            pause = start + interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    finally:
        conn.close()
    json.dump(samples, sys.stdout)
    return 0


CLIENT = ("import sys\n"
          "sys.path.insert(0, sys.argv[1])\n"
          "import refresh_ahead\n"
          "sys.exit(refresh_ahead.client_main(sys.argv[2:]))\n")


# ------------------------------------------------------------------ one setting


def seed(moto_port, value):
    """The one parameter, in a moto emptied first (moto's state is per process: bench.py's
    earlier sections left theirs)."""
    reset = urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", data=b"", method="POST")
    with urllib.request.urlopen(reset, timeout=30) as answer:
        answer.read()
    ssm = fleet.boto3_session().client("ssm", endpoint_url=f"http://127.0.0.1:{moto_port}")
    ssm.put_parameter(Name=NAME, Value=value, Type="String")


def extension_env(port, endpoint, token, ttl, ahead):
    # Built from scratch: nothing from the caller's AWS set-up may leak in, and no
    # AWS_LAMBDA_RUNTIME_API (standalone mode). Log level info: the shutdown summary
    # (refreshed_ahead=...) is an info line.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_SESSION_TOKEN": token,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
        "SSM_PARAMETER_STORE_TTL": str(ttl),
        "PARAMETERS_SECRETS_EXTENSION_REFRESH_AHEAD": str(ahead),
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info",
    }


def wait_listening(proc, port, logfile, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise RuntimeError(f"the extension did not answer /ping (exit status {proc.poll()}):\n{tail(logfile)}")


def tail(logfile, lines=10):
    try:
        with open(logfile, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def log_facts(logfile):
    """The shutdown summary's counters, and the WARN / ERROR lines."""
    with open(logfile, errors="replace") as f:
        lines = f.read().splitlines()
    summary = {}
    for line in lines:
        found = re.search(r"summary: (.*)$", line)
        if found:
            summary = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)(?= |$)", found.group(1))}
    return {"summary": summary,
            "warn_lines": sum(1 for line in lines if "] WARN " in line),
            "error_lines": sum(1 for line in lines if "] ERROR " in line),
            "log_tail": "\n".join(lines[-5:])}


def run_setting(ahead, python, command, proxy, ttl, seconds, interval_ms, value, logdir):
    """One fresh extension with REFRESH_AHEAD=ahead, the client's loop against it, and the
    calls the forwarder saw meanwhile; the raw figures."""
    token = secrets.token_hex(24)
    (port,) = fleet.free_ports(1)
    argv, cwd = command
    logfile = os.path.join(logdir, f"extension-{ahead}.log")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, env=extension_env(port, proxy.url, token, ttl, ahead), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, port, logfile)
        proxy.reset()
        path = "/systemsmanager/parameters/get?name=" + urllib.parse.quote(NAME, safe="")
        client = subprocess.run([python, "-S", "-c", CLIENT, str(BENCH), str(port), path, token, value,
                                 str(seconds), str(interval_ms)],
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=seconds + 60)
        if client.returncode != 0:
            raise RuntimeError(f"the client failed ({client.returncode}): {client.stderr[-2000:]}")
        samples = json.loads(client.stdout)
        # A refresh the last hits started may still be in flight: let it end before the
        # stop, so that the call is counted whole and its connection is not cut.
        drain = time.monotonic() + DRAIN_S
        while proxy.snapshot()[1] and time.monotonic() < drain:
            time.sleep(0.01)
    finally:
        fleet.stop_processes([proc])
    calls, in_flight, connection_errors = proxy.snapshot()
    return samples, calls, in_flight, connection_errors, proc.returncode, log_facts(logfile)


def figures(ahead, ttl, samples, calls, in_flight, connection_errors, exit_code, facts):
    """What the table shows for one setting, from the client's samples and the calls."""
    if len(samples) < 2:
        raise RuntimeError(f"the client made {len(samples)} requests: too few to measure")
    t0 = samples[0][0]
    end = samples[-1][0] + samples[-1][1] / 1000.0
    rest = samples[1:]  # the first is the cold miss: it waits on AWS whatever the setting
    latencies = [s[1] for s in rest]
    hits = [s[1] for s in rest if s[3] == "hit"]
    hit_p99 = percentile(hits, 0.99) if hits else None
    answers = collections.Counter(s[3] if s[2] == 200 else f"status {s[2]}" for s in samples)
    # Requests that waited on AWS: every answer after the first that was not a hit.
    waited = [{"at_s": round(s[0] - t0, 3), "ms": round(s[1], 2), "cache": s[3]} for s in rest if s[3] != "hit"]
    aws = [call for call in calls if call["target"] == SSM_GET]
    windows = (end - t0) / ttl
    per_window = collections.Counter(int((call["arrived"] - t0) // ttl) for call in aws)
    # A last window the loop barely entered (the final request's few ms) is listed only
    # when a call fell in it.
    touched = max(math.ceil(windows - 0.01), max(per_window, default=0) + 1)
    counts = [per_window.get(i, 0) for i in range(touched)]
    # The cold miss aside: with refresh ahead the first refresh comes at the set share of
    # the first window, in the same window as the miss, by design.
    after_first = collections.Counter(int((call["arrived"] - t0) // ttl) for call in aws[1:])
    # Slow answers: over the target's bound; and of those, the ones during an AWS call (the
    # extension's refresh thread and this request's thread share one GIL and two cores).
    bound = SLOW_FACTOR * hit_p99 if hit_p99 is not None else None
    slow = [s for s in rest if bound is not None and s[1] > bound]
    during_call = sum(1 for s in slow if any(c["arrived"] < s[0] + s[1] / 1000.0 and c["answered"] > s[0]
                                             for c in aws))
    # Where each slow answer began, from the nearest AWS call's arrival (negative: before it,
    # as the hit that starts a refresh does).
    slow_at = [{"at_s": round(s[0] - t0, 3), "ms": round(s[1], 2), "cache": s[3],
                "from_call_ms": round(min(((s[0] - c["arrived"]) * 1000.0 for c in aws), key=abs), 1)
                if aws else None} for s in slow]
    # The request that led each call but the first: the last one begun before the call
    # arrived. Off, that is the miss that waited for it; on, the hit that started a refresh.
    starts = [s[0] for s in samples]
    leaders = []
    for call in aws[1:]:
        index = bisect.bisect_right(starts, call["arrived"]) - 1
        if index >= 1:
            leaders.append(round(samples[index][1], 2))
    call_ms = sorted((c["answered"] - c["arrived"]) * 1000.0 for c in aws)
    return {
        "ahead": ahead,
        "requests": len(samples),
        "seconds": end - t0,
        "latency_ms": {"p50": statistics.median(latencies), "p99": percentile(latencies, 0.99),
                       "max": max(latencies), "hit_p99": hit_p99, "first": samples[0][1]},
        "answers": dict(answers),
        "wrong_values": sum(1 for s in samples if s[2] == 200 and not s[4]),
        "waited_on_aws": waited,
        "slow_answers": {"bound_ms": bound, "count": len(slow), "during_an_aws_call": during_call,
                         "answers": slow_at},
        "leaders_ms": leaders,
        "aws_calls": len(aws),
        "other_calls": len(calls) - len(aws),
        "calls_at_s": [round(c["arrived"] - t0, 3) for c in aws],
        "aws_call_ms": {"p50": statistics.median(call_ms), "max": call_ms[-1]} if call_ms else None,
        "windows": windows,
        "calls_per_window": len(aws) / windows,
        "calls_by_window": counts,
        "most_in_a_window": max(counts, default=0),
        "most_in_a_window_after_the_cold_miss": max(after_first.values(), default=0),
        "ratio": max(latencies) / hit_p99 if hit_p99 else None,
        "calls_in_flight_at_stop": in_flight,
        "proxy_connection_errors": connection_errors,
        "exit_code": exit_code,
        **facts,
    }


def judge(f):
    """(target text, passed): the issue's targets for one setting."""
    misses = f["answers"].get("miss", 0)
    refreshed = f["summary"].get("refreshed_ahead")
    clean = not f["wrong_values"] and set(f["answers"]) <= {"hit", "miss"}
    if f["ahead"]:
        passed = (clean and f["ratio"] is not None and f["ratio"] <= SLOW_FACTOR and misses == 1
                  and not f["waited_on_aws"] and f["most_in_a_window_after_the_cold_miss"] <= 1)
        return f"max <= {SLOW_FACTOR:g}x hit p99, 1 miss, <= 1 call a window", passed
    passed = clean and f["aws_calls"] == misses and f["most_in_a_window"] <= 1 and refreshed in (0, None)
    return "calls = misses, <= 1 a window, 0 ahead", passed


def measure(python, extension, ttl=DEFAULT_TTL, seconds=DEFAULT_SECONDS, interval_ms=DEFAULT_INTERVAL_MS,
            latency_ms=DEFAULT_LATENCY_MS, aheads=DEFAULT_AHEAD, as_script=False):
    """Each REFRESH_AHEAD setting in turn against one moto and one forwarder; a dict."""
    began = time.perf_counter()
    result = {"settings": {"ttl": ttl, "seconds": seconds, "interval_ms": interval_ms, "aws_latency_ms": latency_ms,
                           "ahead": list(aheads), "name": NAME,
                           "extension_started": ("as a script" if as_script
                                                 else "from bytecode, as the layer's bootstrap does"),
                           "load_average_at_start": os.getloadavg()[0], **fleet.machine()},
              "rows": []}
    value = f"hot-{secrets.token_hex(8)}"  # random: a value from another run can never pass the check
    with fleet.moto_behind(lambda moto_port: LatencyProxy(moto_port, latency_ms / 1000.0)) as (proxy, moto_port), \
            tempfile.TemporaryDirectory(prefix="refresh-ahead-") as logdir:
        seed(moto_port, value)
        command = fleet.extension_command(python, extension, logdir, as_script)
        for ahead in aheads:
            log(f"REFRESH_AHEAD={ahead}: one key every {interval_ms:g} ms for {seconds:g} s, TTL {ttl} s, "
                f"AWS round trip {latency_ms:g} ms")
            raw = run_setting(ahead, python, command, proxy, ttl, seconds, interval_ms, value, logdir)
            f = figures(ahead, ttl, *raw)
            f["target"], f["passed"] = judge(f)
            result["rows"].append(f)
    result["settings"]["load_average_at_end"] = os.getloadavg()[0]
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


# ------------------------------------------------------------------ reporting


def ms(value):
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def label(f):
    return f"REFRESH_AHEAD {f['ahead']}" + (" (off)" if not f["ahead"] else "")


def answers_text(f):
    a = f["answers"]
    others = ", ".join(f"{k} {v}" for k, v in sorted(a.items()) if k not in ("hit", "miss"))
    return f"{a.get('hit', 0)} / {a.get('miss', 0)}" + (f" + {others}" if others else "")


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def most_text(f):
    """The most calls in one window, and without the cold miss when that differs (with
    refresh ahead, the first refresh falls in the cold miss's window)."""
    most, after = f["most_in_a_window"], f["most_in_a_window_after_the_cold_miss"]
    return str(most) if most <= 1 or most == after else f"{most} ({after} after the cold miss)"


def notes(f, settings):
    lat = f["latency_ms"]
    parts = [f"first request (the cold miss, left out) {ms(lat['first'])} ms",
             f"AWS calls at {', '.join(f'{t:.2f}' for t in f['calls_at_s'])} s",
             f"calls by {settings['ttl']} s window: {' '.join(str(c) for c in f['calls_by_window'])}"]
    if f["aws_call_ms"]:
        parts.append(f"each call {ms(f['aws_call_ms']['p50'])} ms p50, {ms(f['aws_call_ms']['max'])} ms max "
                     f"at the forwarder ({settings['aws_latency_ms']:g} ms added)")
    if f["leaders_ms"]:
        who = "hits that started a refresh" if f["ahead"] else "misses"
        parts.append(f"the requests that led the calls after the first ({who}): "
                     + ", ".join(f"{x:.1f}" for x in f["leaders_ms"]) + " ms")
    waited = f["waited_on_aws"]
    if waited:
        shown = ", ".join(f"{w['cache']} {w['ms']:.1f} ms at {w['at_s']:.2f} s" for w in waited[:8])
        parts.append(f"{plural(len(waited), 'answer')} after the first waited on AWS: {shown}"
                     + (" ..." if len(waited) > 8 else ""))
    else:
        parts.append("no answer after the first waited on AWS")
    slow = f["slow_answers"]
    if slow["bound_ms"] is not None:
        shown = ", ".join(f"{a['cache']} {a['ms']:.1f} ms at {a['at_s']:.2f} s ({a['from_call_ms']:+.0f} ms from "
                          "a call's arrival)" for a in slow["answers"][:6] if a["from_call_ms"] is not None)
        parts.append(f"{plural(slow['count'], 'answer')} over {ms(slow['bound_ms'])} ms (2x the hit p99), "
                     f"{slow['during_an_aws_call']} of them while an AWS call was in flight"
                     + (f": {shown}" if shown else "") + (" ..." if slow["count"] > 6 else ""))
    summary = f["summary"]
    if summary:
        parts.append("extension summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
    parts.append(f"extension logs: {f['warn_lines']} WARN, {f['error_lines']} ERROR lines; exit {f['exit_code']}")
    if f["wrong_values"]:
        parts.append(f"{f['wrong_values']} WRONG VALUES")
    if f["calls_in_flight_at_stop"] or f["proxy_connection_errors"] or f["other_calls"]:
        parts.append(f"calls in flight at the stop {f['calls_in_flight_at_stop']}, forwarder connection errors "
                     f"{f['proxy_connection_errors']}, calls other than GetParameter {f['other_calls']}")
    return "; ".join(parts)


def report(result):
    """Rows for bench.py's table: (figure, value, reference, note, ratio, target, passed)."""
    st = result["settings"]
    rows = []
    for f in result["rows"]:
        lat = f["latency_ms"]
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.1f}x"
        rows.append((f"{label(f)}, TTL {st['ttl']} s, {f['requests']} requests in {f['seconds']:.1f} s",
                     f"max {ms(lat['max'])} ms, p99 {ms(lat['p99'])} ms",
                     f"hit p99 {ms(lat['hit_p99'])} ms",
                     f"p50 {ms(lat['p50'])} ms; hit / miss {answers_text(f)}; AWS calls {f['aws_calls']}, "
                     f"{f['calls_per_window']:.2f} a window, at most {most_text(f)} in one; " + notes(f, st),
                     f"max {ratio}", f["target"], f["passed"]))
    return rows


COLUMNS = ("setting", "requests", "p50 ms", "p99 ms", "max ms", "hit p99 ms", "hit / miss", "AWS calls",
           "a window", "most in one", "max / hit p99", "target", "result")


def print_table(result, out=sys.stdout):
    st = result["settings"]
    pace = "back to back" if not st["interval_ms"] else f"every {st['interval_ms']:g} ms (start to start)"
    out.write(f"refresh ahead: {st['name']} read {pace} on one keep-alive connection for {st['seconds']:g} s, "
              f"TTL {st['ttl']} s, AWS round trip {st['aws_latency_ms']:g} ms (added by the forwarder); "
              f"extension started {st['extension_started']}\n")
    out.write(f"machine: {st['cpu']}, {st['cpus']} CPUs, Python {st['python']}; load average (1 min) "
              f"{st['load_average_at_start']:.1f} at start, {st['load_average_at_end']:.1f} at end; "
              f"ran {result['seconds']} s\n")
    out.write("latency: every request but the first (the cold miss); AWS calls: GetParameter calls the forwarder "
              f"saw; a window: calls / windows elapsed ({st['ttl']} s each, from the first request); most in one: "
              "the most calls in one window\n\n")
    table = [COLUMNS]
    for f in result["rows"]:
        lat = f["latency_ms"]
        table.append((label(f), f"{f['requests']:,}", ms(lat["p50"]), ms(lat["p99"]), ms(lat["max"]),
                      ms(lat["hit_p99"]), answers_text(f), str(f["aws_calls"]),
                      f"{f['calls_per_window']:.2f} of {f['windows']:.1f}", most_text(f),
                      "-" if f["ratio"] is None else f"{f['ratio']:.1f}x", f["target"], fleet.verdict(f["passed"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for index, row in enumerate(table):
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * width for width in widths) + "\n")
    out.write("\nnotes:\n")
    for f in result["rows"]:
        out.write(f"- {label(f)}: {notes(f, st)}\n")


# ------------------------------------------------------------------ main


def ahead_list(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 99 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated percents from 0 to 99")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL,
                   help=f"SSM_PARAMETER_STORE_TTL, whole seconds (default {DEFAULT_TTL})")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help=f"how long the client reads, per setting (default {DEFAULT_SECONDS:g})")
    p.add_argument("--interval-ms", type=float, default=DEFAULT_INTERVAL_MS,
                   help=f"one request every this many ms, start to start; 0: back to back "
                        f"(default {DEFAULT_INTERVAL_MS:g})")
    p.add_argument("--aws-latency-ms", type=float, default=DEFAULT_LATENCY_MS,
                   help=f"added to every AWS call by the forwarder (default {DEFAULT_LATENCY_MS:g})")
    p.add_argument("--ahead", type=ahead_list, default=list(DEFAULT_AHEAD),
                   help="REFRESH_AHEAD settings to run, comma-separated (default 0,80)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--python", default=os.path.realpath(sys.executable),
                   help="interpreter for the extension and the client (run with -S; default: this one, resolved)")
    p.add_argument("--extension", default=str(ROOT / "extension.py"), help="path of extension.py")
    p.add_argument("--as-script", action="store_true",
                   help="start the extension as `python -S extension.py` instead of as the layer does")
    args = p.parse_args(argv)
    if not 1 <= args.ttl <= 3600 or args.seconds <= 0 or args.interval_ms < 0 or args.aws_latency_ms < 0:
        p.error("--ttl must be 1 to 3600, --seconds above 0, --interval-ms and --aws-latency-ms 0 or more")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.extension).is_file():
        print(f"refresh-ahead: {args.extension} not found", file=sys.stderr)
        return 2
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)  # boto3 and urllib must talk to loopback directly
    try:
        result = measure(args.python, args.extension, args.ttl, args.seconds, args.interval_ms, args.aws_latency_ms,
                         args.ahead, args.as_script)
    except ImportError as exc:
        print(f"refresh-ahead: {exc}: it needs boto3 and moto[server]; run it with the dev venv "
              "(.venv/bin/python bench/refresh_ahead.py)", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"refresh-ahead: could not complete: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
