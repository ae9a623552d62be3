"""Memory and load.

- The cache never holds more than PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE items: shown
  by counting hits after a pass over more names than fit, and by the resident memory
  (VmRSS of the extension process, /proc/<pid>/status) staying bounded under a churn
  of many distinct names.
- 32 concurrent keep-alive clients making 20,000 requests across hits and misses: no
  error, no deadlock, no request over the client timeout.
- A value of Secrets Manager's maximum size (65,536 bytes, Secrets Manager quotas:
  "Maximum length of a secret value: 65,536 bytes") round-trips intact, as a string
  and as binary, through the fake and through moto.

Memory bounds are deliberately generous (they catch unbounded growth, not a few MB);
speed is not asserted (the benchmark script measures it).

The churn runs 20,000 distinct names by default (about 7 s on 2 cores): every one is a
miss that costs a signed AWS call, and 20 times the cache size is enough to show that
memory stops growing. RELIABILITY_CHURN_NAMES=100000 runs the full-size churn, five
times as long.
"""

import base64
import json
import os
import random
import string
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from conftest import CACHE_HEADER, SM_GET, SSM_GET, TESTS_DIR, sm_path, ssm_path

CHURN_NAMES = int(os.environ.get("RELIABILITY_CHURN_NAMES", "20000"))


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


@pytest.fixture
def fake_process():
    """The fake in its own process (its work does not share the test's GIL)."""
    proc = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "fake_aws.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_clients(ext, paths_per_client, timeout=10.0, check=None):
    """Each client walks its list of paths on one keep-alive connection.

    Returns (errors, max_latency_s, cache header counts). ``check(path, body)``
    validates each 200 body.
    """
    errors = []
    latencies = [0.0] * len(paths_per_client)
    headers = {}
    lock = threading.Lock()

    def client(i, paths):
        conn = ext.connection(timeout=timeout)
        worst = 0.0
        local = {}
        try:
            for path in paths:
                started = time.monotonic()
                try:
                    status, hdrs, body = ext.request_on(conn, "GET", path)
                except Exception as exc:
                    with lock:
                        errors.append((path, repr(exc)))
                    conn.close()
                    conn = ext.connection(timeout=timeout)
                    continue
                worst = max(worst, time.monotonic() - started)
                if status != 200:
                    with lock:
                        errors.append((path, status, body[:200]))
                    continue
                if check is not None:
                    problem = check(path, body)
                    if problem:
                        with lock:
                            errors.append((path, problem))
                cache = hdrs.get(CACHE_HEADER)
                local[cache] = local.get(cache, 0) + 1
        finally:
            conn.close()
            latencies[i] = worst
            with lock:
                for k, v in local.items():
                    headers[k] = headers.get(k, 0) + v

    threads = [threading.Thread(target=client, args=(i, p), daemon=True)
               for i, p in enumerate(paths_per_client)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients deadlocked (still running after 300 s)"
    return errors, max(latencies), headers


# ------------------------------------------------------------------ cache cap


@pytest.mark.parametrize("cap", [10, 1000])
def test_cache_holds_at_most_its_size(fake, start_extension, cap):
    ext = start_extension(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE": cap,
                                         "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn"})
    names = [f"/cap/{i}" for i in range(cap + cap // 2)]
    conn = ext.connection()
    try:
        for name in names:
            assert ext.request_on(conn, "GET", ssm_path(name))[0] == 200
        assert fake.calls(SSM_GET) == len(names)
        # Second pass, newest first. A hit in this pass means the name was still cached
        # when the first pass ended, so the hits can never exceed the cap.
        hits = 0
        for name in reversed(names):
            status, hdrs, _ = ext.request_on(conn, "GET", ssm_path(name))
            assert status == 200
            hits += hdrs.get(CACHE_HEADER) == "hit"
    finally:
        conn.close()
    assert hits <= cap, f"{hits} hits: more than {cap} items were cached"
    # And the cache works at all: the newest names survived.
    assert hits >= 1
    assert fake.calls(SSM_GET) == len(names) + (len(names) - hits)


# ------------------------------------------------------------------ memory churn


@pytest.mark.slow  # the churn: ~7 s at the default 20,000 names
def test_memory_stays_bounded_under_name_churn(fake_process, start_extension):
    ext = start_extension(fake_process, env={"PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE": 1000,
                                             "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn",
                                             "PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 64})
    total = CHURN_NAMES
    checkpoint = max(2000, total // 5)
    n_clients = 6
    value_prefix = b'"Value": "value-of-/churn/'

    def check(path, body):
        return None if value_prefix in body else f"unexpected body {body[:120]!r}"

    def paths(lo, hi):
        # Interleave so every client keeps a stream of distinct names.
        return [[ssm_path(f"/churn/{j}") for j in range(lo + i, hi, n_clients)]
                for i in range(n_clients)]

    started = time.monotonic()
    errors, _, _ = run_clients(ext, paths(0, checkpoint), check=check)
    assert not errors, errors[:5]
    rss_early = vm_rss_kib(ext.proc.pid)
    errors, _, headers = run_clients(ext, paths(checkpoint, total), check=check)
    assert not errors, errors[:5]
    rss_late = vm_rss_kib(ext.proc.pid)
    elapsed = time.monotonic() - started
    print(f"churn: {total} distinct names in {elapsed:.1f} s "
          f"({total / elapsed:.0f}/s); VmRSS after {checkpoint}: {rss_early} KiB, "
          f"after {total}: {rss_late} KiB; cache headers {headers}")
    assert headers.get("miss", 0) == total - checkpoint, headers
    assert rss_late < 120 * 1024, f"VmRSS {rss_late} KiB after {total} names"
    assert rss_late - rss_early < 16 * 1024, (
        f"VmRSS grew from {rss_early} to {rss_late} KiB between {checkpoint} and "
        f"{total} names: the cache is not bounded"
    )
    assert ext.alive()


# -------------------------------------------------------------- concurrent load


def test_32_keep_alive_clients_20000_requests(fake, start_extension):
    ext = start_extension(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn"})
    rng = random.Random(4)
    n_clients, per_client = 32, 625  # 20,000 requests
    hot = [f"/hot/{i}" for i in range(100)] + [f"hot-secret-{i}" for i in range(20)]
    plans = []
    miss_id = 0
    for _ in range(n_clients):
        plan = []
        for _ in range(per_client):
            if rng.random() < 0.1:
                miss_id += 1
                key = f"/miss/{miss_id}" if miss_id % 4 else f"miss-secret-{miss_id}"
            else:
                key = rng.choice(hot)
            plan.append(ssm_path(key) if key.startswith("/") else sm_path(key))
        plans.append(plan)

    def check(path, body):
        data = json.loads(body)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if "name" in query:
            got, want = data["Parameter"]["Value"], "value-of-" + query["name"][0]
        else:
            got, want = data["SecretString"], "value-of-" + query["secretId"][0]
        return None if got == want else f"value {got!r}, expected {want!r}"

    started = time.monotonic()
    errors, worst, headers = run_clients(ext, plans, timeout=10.0, check=check)
    elapsed = time.monotonic() - started
    print(f"load: 20000 requests, 32 keep-alive clients, {elapsed:.1f} s, "
          f"slowest {worst * 1000:.0f} ms, cache headers {headers}")
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
    assert sum(headers.values()) == n_clients * per_client
    # Hits and misses were both exercised, and every miss reached AWS at most once
    # per distinct name plus refetches after eviction.
    assert headers.get("hit", 0) > 10000 and headers.get("miss", 0) >= miss_id, headers
    assert fake.calls() >= miss_id + len(hot)
    assert ext.alive()


# ----------------------------------------------------------------- big values


def _big_string():
    # Every printable ASCII character, quotes, backslashes and control characters
    # that JSON must escape; exactly 65,536 characters (= bytes, ASCII).
    rng = random.Random(65536)
    alphabet = string.printable + '"\\\x01\x1f'
    return "".join(rng.choice(alphabet) for _ in range(65536))


def _secret_string(data):
    assert data["SecretBinary"] is None
    return data["SecretString"]


def _secret_binary(data):
    assert data["SecretString"] is None
    return base64.b64decode(data["SecretBinary"], validate=True)


@pytest.mark.parametrize("kind,value,decode", [
    ("string", _big_string(), _secret_string),
    ("binary", random.Random(7).randbytes(65536), _secret_binary),
])
def test_max_size_secret_round_trips(fake, start_extension, kind, value, decode):
    fake.set_secret("big-" + kind, **{kind: value})
    ext = start_extension(fake.url)
    for expected_cache in ("miss", "hit"):
        status, hdrs, body = ext.get(sm_path("big-" + kind))
        assert status == 200
        assert hdrs.get(CACHE_HEADER) == expected_cache
        got = decode(json.loads(body))
        assert len(got) == 65536 and got == value
    assert fake.calls(SM_GET) == 1


def test_max_size_secret_via_moto(secretsmanager, moto, start_extension):
    value = _big_string()
    binary = random.Random(8).randbytes(65536)
    secretsmanager.create_secret(Name="moto-big", SecretString=value)
    secretsmanager.create_secret(Name="moto-big-bin", SecretBinary=binary)
    ext = start_extension(moto)
    status, _, body = ext.get(sm_path("moto-big"))
    assert status == 200, body[:300]
    assert json.loads(body)["SecretString"] == value
    status, _, body = ext.get(sm_path("moto-big-bin"))
    assert status == 200, body[:300]
    assert base64.b64decode(json.loads(body)["SecretBinary"]) == binary
