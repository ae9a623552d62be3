"""bench/fleet.py, the fleet benchmark: its throttle answers as AWS does and counts right,
and a tiny run of every scenario prints the figures that are exact when nothing is
throttled. Times are printed by the benchmark, never asserted here."""

import http.client
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, printed_table

FLEET = ROOT / "bench" / "fleet.py"


def load_fleet():
    spec = importlib.util.spec_from_file_location("fleet", FLEET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fleet = load_fleet()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_bucket_spends_a_token_a_call_refills_at_the_rate_and_holds_at_most_its_capacity():
    clock = Clock()
    bucket = fleet.TokenBucket(rate=2, capacity=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.25  # half a token
    assert bucket.take() is False
    clock.now += 0.25  # a whole one, the refused call having cost nothing
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 60  # a long pause fills it to its capacity, no more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    bucket.reset()
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


@pytest.fixture
def upstream():
    """A stand-in for moto: answers 200 and records what reached it."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.headers["Host"], self.headers["X-Amz-Target"], body))
            data = b'{"Parameter": {}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def test_the_throttle_answers_as_aws_does_without_reaching_moto_and_counts_by_target(upstream):
    port, seen = upstream
    proxy = fleet.ThrottleProxy(port, rate=0.001, capacity=2)  # two tokens, none more during the test
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.server_address[1], timeout=10)
    try:
        answers = []
        for target in ("AmazonSSM.GetParameter", "AmazonSSM.GetParameters", "AmazonSSM.GetParametersByPath",
                       "secretsmanager.GetSecretValue", "AmazonSSM.GetParameter"):
            body = json.dumps({"Name": "/a"}).encode()
            # One keep-alive connection throughout: a throttled answer must leave it usable.
            conn.request("POST", "/", body=body, headers={"X-Amz-Target": target, "Host": "ssm.example:443",
                                                           "Content-Type": "application/x-amz-json-1.1"})
            response = conn.getresponse()
            answers.append((response.status, dict(response.getheaders()), response.read()))
    finally:
        conn.close()
        proxy.shutdown()
        proxy.server_close()

    assert [status for status, _, _ in answers] == [200, 200, 400, 200, 400]
    for status, headers, body in answers:
        if status == 400:
            assert body == b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
            assert headers["Content-Type"] == "application/x-amz-json-1.1"
            assert headers["x-amzn-ErrorType"] == "ThrottlingException"
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                headers["x-amzn-RequestId"])
            assert headers["Content-Length"] == str(len(body))
    # What reached the upstream went as it was sent, its Host included; throttled calls never did.
    assert seen == [("ssm.example:443", target, b'{"Name": "/a"}') for target in
                    ("AmazonSSM.GetParameter", "AmazonSSM.GetParameters", "secretsmanager.GetSecretValue")]
    figures = proxy.snapshot()
    assert (figures["accepted"], figures["throttled"]) == (2, 2)  # Secrets Manager is not Parameter Store
    assert figures["by_target"] == {
        "AmazonSSM.GetParameter": {"accepted": 1, "throttled": 1},
        "AmazonSSM.GetParameters": {"accepted": 1},
        "AmazonSSM.GetParametersByPath": {"throttled": 1},
        "secretsmanager.GetSecretValue": {"accepted": 1},
    }


@pytest.mark.slow
def test_a_tiny_fleet_of_every_scenario_with_nothing_throttled_gets_every_value_in_exact_calls():
    # 3 functions x 3 parameters: at most 9 calls a scenario, within the bucket's 20 tokens
    # (it is full again at each scenario), so no call is throttled and the counts are exact.
    done = subprocess.run([sys.executable, str(FLEET), "--n", "3", "--k", "3", "--rate", "20"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "N=3 functions started at once, K=3 parameters each, R=20 calls/s" in done.stdout
    rows = printed_table(done.stdout, "how the functions read")
    # functions with every value, errors, calls accepted / throttled, ..., limit N*calls/R
    expected = {
        "one by one through the extension": ("3 of 3", "0", "9 / 0", "0.45 s"),
        "one get-multiple call": ("3 of 3", "0", "3 / 0", "0.15 s"),
        # One batched prefetch call an extension: the reads all hit the cache, or join
        # the call in flight (prefetch claims its names before the extension serves).
        "prefetch configured, then one by one": ("3 of 3", "0", "3 / 0", "0.15 s"),
        "boto3 directly, standard retries": ("3 of 3", "0", "9 / 0", "0.45 s"),
    }
    assert set(rows) == set(expected)
    for label, (every, errors, calls, limit) in expected.items():
        cells = rows[label]
        assert (cells[0], cells[1], cells[2], cells[4]) == (every, errors, calls, limit), (label, cells)
    assert rows["one by one through the extension"][-2:] == ["0 errors", "pass"]
    assert rows["one get-multiple call"][-2] == "<= 3 calls, 0 errors, last <= 1.23 s"  # 1.5 x 0.15 s + 1 s
    assert rows["boto3 directly, standard retries"][-2:] == ["-", "info"]
    assert "notes:" in done.stdout

    # The extension as a script this time (compiled at start), and the figures as JSON.
    done = subprocess.run([sys.executable, str(FLEET), "--n", "2", "--k", "12", "--rate", "20", "--scenarios",
                           "get-multiple", "--as-script", "--json"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["settings"]["capacity"], result["settings"]["extension_started"]) == (20, "as a script")
    (figures,) = result["scenarios"]
    # 12 names: two GetParameters calls (10 + 2) for each of the 2 functions.
    assert {key: figures[key] for key in ("scenario", "with_every_value", "errors", "accepted", "throttled",
                                          "calls_per_function", "limit_s")} == {
        "scenario": "get-multiple", "with_every_value": 2, "errors": 0, "accepted": 4, "throttled": 0,
        "calls_per_function": 2, "limit_s": 0.2}
    assert figures["proxy"]["by_target"] == {"AmazonSSM.GetParameters": {"accepted": 4}}


def test_bad_options_are_refused():
    done = subprocess.run([sys.executable, str(FLEET), "--k", "51"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--k from 1 to 50" in done.stderr
    done = subprocess.run([sys.executable, str(FLEET), "--scenarios", "one-by-one,nope"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "unknown scenario" in done.stderr
