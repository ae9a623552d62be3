#!/usr/bin/env python3
"""What a hostile caller or a hostile AWS can make the extension hold or wait
(docs/pitfalls.md, "What a hostile or broken peer does").

    python3 bench/hostile.py [--quick] [--extension PATH]

Standard library only; runs from the repository root or anywhere. Everything is on
127.0.0.1: each figure starts its own ``python3 extension.py`` (a clean environment:
AWS_REGION, AWS_ENDPOINT_URL to a fake AWS, dummy keys, AWS_TOKEN,
PARAMETERS_SECRETS_EXTENSION_HTTP_PORT) against ``tests/fake_aws.py`` (imported by path,
served from this process). Prints one line per figure, with its unit and what it means:

(a) the extension's peak RSS (VmHWM, /proc/PID/status) before and after 64 concurrent
    GET /ping requests each carrying 6.5 MB of headers (100 lines of 64 KiB);
(b) its peak RSS after one request whose AWS answer is 200 MB (streamed by the fake,
    once with a declared Content-Length, once chunked), and the status the caller got;
(c) the time to the answer when AWS sends status and headers and then drips the body at
    10 bytes/s: with SSM_PARAMETER_STORE_TIMEOUT_MILLIS=1000, and without a budget
    (the first attempt drips, the second answers at once; skipped with --quick);
(d) the number of AWS calls a 3-second loop of refreshNow=true on one name makes.

Every wait is bounded (socket timeouts, a bounded start-up wait, and an overall
watchdog); the extensions are stopped at the end. Takes about 10 s (25 s without
--quick). ``--extension`` measures another copy of extension.py (an older version, say).
Exit status 0 when it ran, 2 when it could not.
"""

import argparse
import http.client
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "extension.py"
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
MIB = 1024 * 1024
WATCHDOG_SECONDS = 240

_spec = importlib.util.spec_from_file_location("fake_aws", ROOT / "tests" / "fake_aws.py")
fake_aws = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_aws)


# ------------------------------------------------------------------ the extension


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Extension:
    """``python3 extension.py`` on a free port, talking to ``endpoint``."""

    running = []
    script = EXTENSION

    def __init__(self, endpoint, **env):
        self.port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.dir = tempfile.mkdtemp(prefix="hostile-")
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": self.dir,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_TOKEN": self.token,
            "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(self.port),
            "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn",
        }
        full_env.update({k: str(v) for k, v in env.items()})
        self.log = open(os.path.join(self.dir, "stderr.txt"), "wb")
        self.proc = subprocess.Popen([sys.executable, str(Extension.script)], env=full_env, cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        Extension.running.append(self)
        deadline = time.monotonic() + 10
        while self.get("/ping", timeout=1)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the extension did not start: "
                                   + Path(self.dir, "stderr.txt").read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def get(self, path, timeout=10.0, conn=None):
        """(status, headers, body); status None when no answer came (timeout, reset)."""
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={TOKEN_HEADER: self.token})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except (OSError, http.client.HTTPException):
            return None, {}, b""
        finally:
            if own:
                conn.close()

    def peak_rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        if self in Extension.running:
            Extension.running.remove(self)

    @classmethod
    def stop_all(cls):
        for ext in list(cls.running):
            ext.stop()


def ssm_path(name, **query):
    parts = ["name=" + urllib.parse.quote(name, safe="")] + [f"{k}={v}" for k, v in query.items()]
    return "/systemsmanager/parameters/get?" + "&".join(parts)


def error_type(body):
    try:
        return json.loads(body).get("__type", "?")
    except (ValueError, AttributeError):
        return "(not JSON)"


def described(status, body):
    if status is None:
        return "no answer"
    if status == 200:
        return "200"
    return f"{status} {error_type(body)}"


# ------------------------------------------------------------------ the figures


def header_floods(fake):
    """(a): 64 concurrent GET /ping, each with 100 header lines of 64 KiB."""
    ext = Extension(fake.url)
    try:
        ext.get("/ping")
        before = ext.peak_rss_mib()
        lines = [f"X-Flood-{i:03d}: " for i in range(100)]
        lines = [name + "a" * (64 * 1024 - len(name) - 2) for name in lines]
        payload = ("GET /ping HTTP/1.1\r\nHost: localhost\r\n" + "\r\n".join(lines)
                   + "\r\n\r\n").encode("latin-1")
        outcomes = []
        lock = threading.Lock()

        def flood():
            outcome = "no answer"
            try:
                with socket.create_connection(("127.0.0.1", ext.port), timeout=20) as sock:
                    try:
                        sock.sendall(payload)
                    except OSError:
                        pass  # the extension stopped reading: its answer may be there
                    resp = http.client.HTTPResponse(sock)
                    resp.begin()
                    outcome = str(resp.status)
                    resp.read()
            except (OSError, http.client.HTTPException):
                outcome = "closed or reset"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(64)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, 60 - (time.monotonic() - started)))
        after = ext.peak_rss_mib()
        ping = ext.get("/ping", timeout=10)[0]
        counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        unfinished = sum(t.is_alive() for t in threads)
        print(f"(a) peak RSS before the header floods: {before:.1f} MiB (VmHWM after start and one /ping)")
        print(f"(a) peak RSS after 64 concurrent GET /ping with {len(payload) / 1e6:.1f} MB of headers "
              f"each (100 lines of 64 KiB): {after:.1f} MiB (+{after - before:.1f} MiB); answers: "
              + ", ".join(f"{o} x{n}" for o, n in counts.items())
              + (f", {unfinished} unfinished after 60 s" if unfinished else "")
              + f"; /ping afterwards: {ping or 'no answer'}")
    finally:
        ext.stop()


def huge_answer(fake, framing):
    """(b): one request whose AWS answer is 200 MB."""
    ext = Extension(fake.url)
    try:
        before = ext.peak_rss_mib()
        name = "/hostile/huge-" + framing
        fake.set_default(fake_aws.Do("big", size=200 * 1000 * 1000, framing=framing), name=name)
        started = time.monotonic()
        status, _, body = ext.get(ssm_path(name), timeout=120)
        elapsed = time.monotonic() - started
        after = ext.peak_rss_mib()
        framed = "declared Content-Length" if framing == "length" else "chunked"
        print(f"(b) peak RSS after one request whose AWS answer is 200 MB ({framed}): {after:.1f} MiB "
              f"(+{after - before:.1f} MiB); the caller got {described(status, body)} after {elapsed:.2f} s "
              f"({fake.calls(name=name)} AWS calls)")
    finally:
        ext.stop()


def dripping_body(fake, budget_ms):
    """(c): time to the answer when the body drips at 10 bytes/s."""
    env = {"SSM_PARAMETER_STORE_TIMEOUT_MILLIS": budget_ms} if budget_ms else {}
    ext = Extension(fake.url, **env)
    try:
        name = f"/hostile/drip-{budget_ms}"
        drip = fake_aws.Do("drip", rate=10, size=10 ** 6)  # 10**6 bytes at 10 B/s: for ever
        if budget_ms:
            fake.set_default(drip, name=name)
            limit = 15
        else:
            fake.script(drip, "ok", name=name)
            limit = 30
        started = time.monotonic()
        status, _, body = ext.get(ssm_path(name), timeout=limit)
        elapsed = time.monotonic() - started
        answer = described(status, body) if status is not None else f"no answer within {limit} s"
        if budget_ms:
            print(f"(c) time to the answer with SSM_PARAMETER_STORE_TIMEOUT_MILLIS={budget_ms} and a body "
                  f"dripping at 10 B/s: {elapsed:.2f} s ({answer}; {fake.calls(name=name)} AWS calls)")
        else:
            print(f"(c) time to the answer without a budget, first attempt dripping at 10 B/s, second ok: "
                  f"{elapsed:.2f} s ({answer}; {fake.calls(name=name)} AWS calls)")
    finally:
        ext.stop()


def refresh_loop(fake):
    """(d): AWS calls made by a 3-second loop of refreshNow=true on one name."""
    ext = Extension(fake.url)
    try:
        name = "/hostile/refresh"
        ext.get(ssm_path(name))
        before = fake.calls(name=name)
        conn = http.client.HTTPConnection("127.0.0.1", ext.port, timeout=10)
        requests = 0
        statuses = set()
        try:
            started = time.monotonic()
            while time.monotonic() - started < 3.0:
                statuses.add(ext.get(ssm_path(name, refreshNow="true"), conn=conn)[0])
                requests += 1
        finally:
            conn.close()
        calls = fake.calls(name=name) - before
        print(f"(d) AWS calls made by a 3-second loop of refreshNow=true on one name: {calls} calls "
              f"for {requests} requests (statuses {sorted(s for s in statuses if s) or 'none'})")
    finally:
        ext.stop()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip (c) without a budget (a 10 s wait)")
    parser.add_argument("--extension", type=Path, default=EXTENSION,
                        help="the extension.py to measure (default: the repository's)")
    args = parser.parse_args(argv)
    Extension.script = args.extension.resolve()
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc/PID/status for VmHWM)", file=sys.stderr)
        return 2

    def watchdog(signum, frame):
        Extension.stop_all()
        print(f"hostile.py: gave up after {WATCHDOG_SECONDS} s", file=sys.stderr)
        os._exit(2)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(WATCHDOG_SECONDS)
    fake = fake_aws.FakeAWS()
    try:
        header_floods(fake)
        huge_answer(fake, "length")
        huge_answer(fake, "chunked")
        dripping_body(fake, 1000)
        if not args.quick:
            dripping_body(fake, 0)
        refresh_loop(fake)
    except RuntimeError as error:
        print(f"hostile.py: {error}", file=sys.stderr)
        return 2
    finally:
        Extension.stop_all()
        fake.close()  # wakes the fake's dripping and streaming handlers
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
