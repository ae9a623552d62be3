"""Upstream faults, injected for real.

Every test starts the real extension as a subprocess (conftest's ``start_extension``)
with ``AWS_ENDPOINT_URL`` pointing at ``fake_aws.FakeAWS``, a stdlib fake of the two
AWS operations that can be scripted to fail per call, and counts the calls that
reached "AWS". What is checked, and where it comes from:

- Retries (the AWS SDKs' "standard" retry mode, README.md): 5xx, connection reset /
  refused / closed mid-body and timeouts are retried, at most 3 attempts in all;
  throttling (``ThrottlingException``, ``TooManyRequestsException``, HTTP 429) is
  retried until the service's timeout setting runs out (docs/design.md, "Throttling";
  the policy itself is unit-tested in tests/test_throttling.py); client errors (not
  found, access denied, validation) are never retried; the whole sequence stays within
  the service's timeout setting.
- One call per miss: concurrent misses for one key share one AWS call, whether it
  succeeds or fails.
- Serve stale (README.md ``PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS``): an
  expired value is served (header ``X-Parameters-Secrets-Cache: stale``, a WARN) when a
  refresh fails transiently, within the bound; never after a client error.
- ``refreshNow`` (README.md: ``true|false|1|0``, anything else 400
  ``InvalidQueryValue``) bypasses the cache, stores the fresh value, and is
  single-flight too.
- ``GET /ping`` needs no token.
"""

import json
import re
import threading
import time

import pytest

from conftest import (
    CACHE_HEADER,
    SM_GET,
    SSM_GET,
    free_port,
    sm_path,
    ssm_path,
    wait_for,
    warn_lines,
)
from fake_aws import Do

# What the caller sees once every attempt failed with the given fault (README.md:
# AWS errors pass through with AWS's status; 502 UpstreamUnreachable; 504
# UpstreamTimeout).
FINAL_STATUS = {
    "throttling": 400,
    "toomany": 400,
    "429": 429,
    "500": 500,
    "503": 503,
    "reset": 502,
    "midbody": 502,
    "hang": 504,
}
FINAL_TYPE = {
    "throttling": "ThrottlingException",
    "toomany": "TooManyRequestsException",
    "429": "UnknownError",  # the fake's 429 body names no error type
    "500": "InternalServerError",
    "503": "ServiceUnavailable",
    "reset": "UpstreamUnreachable",
    "midbody": "UpstreamUnreachable",  # the connection closed before the body ended
    "hang": "UpstreamTimeout",
}

# A small per-service timeout for the "hang" fault: the fake accepts the call and never
# answers, so only the extension's own timeout ends the attempt.
HANG_TIMEOUT_MS = 3000


def body_json(body):
    try:
        return json.loads(body)
    except ValueError:
        pytest.fail(f"body is not JSON: {body[:300]!r}")


# Stopping an extension costs ~0.5 s, so tests that need no special configuration
# share one extension and one fake per module, each test using its own names (the
# fake scripts and counts per name).
SHARED_ENV = {
    "SSM_PARAMETER_STORE_TIMEOUT_MILLIS": HANG_TIMEOUT_MS,
    "PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 256,
}


@pytest.fixture(scope="module")
def shared(fake_module, start_extension_module):
    """(extension, fake) shared by the module; the extension has SHARED_ENV."""
    ext = start_extension_module(fake_module.url, env=SHARED_ENV)
    yield ext, fake_module
    ext.stop()  # before the fake closes


@pytest.fixture
def key(request):
    """A name no other test uses, for the shared extension and fake."""
    return "/t/" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)


# ------------------------------------------------------------------------ retries


@pytest.mark.parametrize("kind", sorted(FINAL_STATUS))
def test_one_transient_fault_then_success_is_retried(shared, key, kind):
    # "hang": the first attempt never gets an answer; only a per-attempt timeout that
    # leaves room for a second attempt within the HANG_TIMEOUT_MS budget gets the value.
    ext, fake = shared
    fake.script(kind, "ok", name=key)
    status, hdrs, body = ext.get(ssm_path(key), timeout=20)
    assert status == 200, (kind, status, body[:300])
    assert body_json(body)["Parameter"]["Value"] == "value-of-" + key
    assert fake.calls(SSM_GET, key) == 2, kind


@pytest.mark.parametrize("kind", ["throttling", "500", "reset", "midbody"])
def test_secrets_manager_transient_fault_then_success_is_retried(shared, key, kind):
    ext, fake = shared
    fake.script(kind, "ok", name=key)
    status, _, body = ext.get(sm_path(key), timeout=20)
    assert status == 200, (kind, status, body[:300])
    assert body_json(body)["SecretString"] == "value-of-" + key
    assert fake.calls(SM_GET, key) == 2


# Throttling answers: retried for as long as the budget lasts, not three times.
THROTTLES = ("throttling", "toomany", "429")


@pytest.mark.parametrize("kind", sorted(set(FINAL_STATUS) - set(THROTTLES)))
def test_three_transient_faults_give_the_error_after_three_attempts(shared, key, kind):
    ext, fake = shared
    # A fourth behaviour is queued: a client that tried a fourth time would succeed.
    fake.script(kind, kind, kind, "ok", name=key)
    started = time.monotonic()
    status, _, body = ext.get(ssm_path(key), timeout=30)
    elapsed = time.monotonic() - started
    assert status == FINAL_STATUS[kind], (kind, status, body[:300])
    err = body_json(body)
    # AWS's own error (or ours), always in the {"__type", "message"} shape.
    assert err["__type"] == FINAL_TYPE[kind], err
    assert isinstance(err.get("message"), str), err
    calls = fake.calls(SSM_GET, key)
    if kind == "hang":
        # Each attempt waits for its timeout; the budget may leave room for fewer than
        # three, never more.
        assert 1 <= calls <= 3, calls
        assert elapsed < HANG_TIMEOUT_MS / 1000 + 3.0, elapsed
    else:
        assert calls == 3, (kind, calls)
    # The error was not cached: the next request reaches AWS (and gets the queued ok).
    if kind != "hang":
        assert ext.get(ssm_path(key))[0] == 200
        assert fake.calls(SSM_GET, key) == 4


@pytest.mark.parametrize("kind", THROTTLES)
def test_throttling_is_retried_past_three_attempts(shared, key, kind):
    ext, fake = shared
    fake.script(kind, kind, kind, kind, "ok", name=key)
    status, _, body = ext.get(ssm_path(key), timeout=30)
    assert status == 200, (kind, status, body[:300])
    assert body_json(body)["Parameter"]["Value"] == "value-of-" + key
    assert fake.calls(SSM_GET, key) == 5


@pytest.mark.parametrize("kind", THROTTLES)
def test_throttling_to_the_end_of_the_budget_gives_aws_error_unchanged(shared, key, kind):
    ext, fake = shared
    fake.set_default(kind, name=key)
    started = time.monotonic()
    status, _, body = ext.get(ssm_path(key), timeout=30)
    elapsed = time.monotonic() - started
    assert status == FINAL_STATUS[kind], (kind, status, body[:300])
    assert body_json(body)["__type"] == FINAL_TYPE[kind]
    assert fake.calls(SSM_GET, key) > 3  # retried well past the quick faults' three attempts
    # The whole sequence stayed within the 3 s budget (plus the answer's way back).
    assert elapsed < HANG_TIMEOUT_MS / 1000 + 1.0, elapsed


@pytest.mark.parametrize(
    "kind, status, error_type",
    [
        ("notfound", 400, "ParameterNotFound"),
        ("accessdenied", 400, "AccessDeniedException"),
        ("validation", 400, "ValidationException"),
    ],
)
def test_client_errors_are_not_retried(shared, key, kind, status, error_type):
    ext, fake = shared
    fake.script(kind, "ok", name=key)
    got, _, body = ext.get(ssm_path(key))
    assert got == status, (got, body[:300])
    err = body_json(body)
    assert err.get("__type") == error_type, err
    # SSM sends ParameterNotFound without a message and AccessDeniedException's text as
    # "Message" (the fake does the same); the extension's error shape has "message" anyway.
    assert isinstance(err.get("message"), str), err
    if kind == "accessdenied":
        assert "not authorized" in err["message"], err
    assert fake.calls(SSM_GET, key) == 1


@pytest.mark.parametrize("kind, error_type", [("notfound", "ResourceNotFoundException"),
                                              ("accessdenied", "AccessDeniedException")])
def test_secrets_manager_client_errors_are_not_retried(shared, key, kind, error_type):
    ext, fake = shared
    fake.script(kind, "ok", name=key)
    got, _, body = ext.get(sm_path(key))
    assert got == 400, (got, body[:300])
    err = body_json(body)
    assert err.get("__type") == error_type, err
    assert err.get("message"), err
    assert fake.calls(SM_GET, key) == 1


def test_connection_refused_gives_502_after_retries_promptly(start_extension):
    # A port nobody listens on: every attempt is refused at once.
    dead = f"http://127.0.0.1:{free_port()}"
    ext = start_extension(dead)
    started = time.monotonic()
    status, _, body = ext.get(ssm_path("/nobody/home"), timeout=20)
    elapsed = time.monotonic() - started
    assert status == 502, (status, body[:300])
    assert body_json(body).get("__type") == "UpstreamUnreachable"
    # Generous bound: only proves backoff between three refused attempts does not
    # turn into a long wait.
    assert elapsed < 5.0, elapsed
    # Still serving afterwards.
    assert ext.get("/ping", token=None)[0] == 200


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_retries_stay_within_the_timeout_budget(fake, start_extension, service):
    # Every call takes 2 s; the caller's budget is 600 ms. The answer must come from
    # the budget, not from 3 x 2 s of attempts.
    fake.set_default(Do("ok", delay_ms=2000))
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TIMEOUT_MILLIS": 600,
                                         "SECRETS_MANAGER_TIMEOUT_MILLIS": 600})
    path = ssm_path("/slow") if service == "ssm" else sm_path("slow")
    started = time.monotonic()
    status, _, body = ext.get(path, timeout=20)
    elapsed = time.monotonic() - started
    assert status == 504, (status, body[:300])
    assert body_json(body).get("__type") == "UpstreamTimeout"
    assert elapsed < 3.0, f"answer took {elapsed:.2f} s with a 600 ms budget"
    assert 1 <= fake.calls() <= 3


# ------------------------------------------------------------- one call per miss


def _concurrent_gets(ext, path, n, timeout=20.0):
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        barrier.wait(timeout=timeout)
        try:
            status, hdrs, body = ext.get(path, timeout=timeout)
            results[i] = (status, hdrs.get(CACHE_HEADER), body)
        except Exception as exc:  # reported below with the index
            results[i] = ("exception", repr(exc), b"")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return results


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_64_concurrent_cold_requests_make_one_call(shared, key, service):
    # The shared extension has MAX_CLIENTS=256: the inbound connection bound is not
    # what is tested here.
    ext, fake = shared
    fake.set_default(Do("ok", delay_ms=1000), name=key)
    path = ssm_path(key) if service == "ssm" else sm_path(key)
    results = _concurrent_gets(ext, path, 64)
    statuses = [r[0] for r in results]
    assert statuses == [200] * 64, statuses
    bodies = {r[2] for r in results}
    assert len(bodies) == 1, "all 64 callers must get the same answer"
    value = json.loads(bodies.pop())
    if service == "ssm":
        assert value["Parameter"]["Value"] == "value-of-" + key
    else:
        assert value["SecretString"] == "value-of-" + key
    assert fake.calls(name=key) == 1, f"{fake.calls(name=key)} AWS calls for 64 concurrent misses"


def test_64_concurrent_cold_requests_share_one_error(shared, key):
    # A client error is not retried, so one shared failed call is exactly one call.
    # Errors are never cached: a request arriving after the call ended would cause a
    # second call, hence the delay that keeps the call in flight (within the shared
    # extension's HANG_TIMEOUT_MS budget).
    ext, fake = shared
    fake.set_default(Do("notfound", delay_ms=1000), name=key)
    results = _concurrent_gets(ext, ssm_path(key), 64)
    statuses = [r[0] for r in results]
    assert statuses == [400] * 64, statuses
    for r in results:
        assert json.loads(r[2]).get("__type") == "ParameterNotFound"
    assert fake.calls(name=key) == 1, f"{fake.calls(name=key)} AWS calls for 64 concurrent misses"


# --------------------------------------------------------------------- serve stale


def _first_non_hit(ext, path, timeout=10.0):
    """Poll ``path`` until the answer is not a cache hit (the TTL ran out)."""

    def probe():
        status, hdrs, body = ext.get(path, timeout=20)
        if status == 200 and hdrs.get(CACHE_HEADER) == "hit":
            return None
        return status, hdrs, body

    return wait_for(probe, timeout=timeout, interval=0.05, message="the TTL to run out")


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_serves_stale_on_transient_failure_then_recovers(fake, start_extension, service):
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TTL": 1,
                                         "SECRETS_MANAGER_TTL": 1})
    if service == "ssm":
        key, path, target = "/stale/p", ssm_path("/stale/p"), SSM_GET
        fake.set_value(key, "old-value")

        def value_of(body):
            return json.loads(body)["Parameter"]["Value"]
    else:
        key, path, target = "stale-s", sm_path("stale-s"), SM_GET
        fake.set_secret(key, string="old-value")

        def value_of(body):
            return json.loads(body)["SecretString"]

    status, hdrs, body = ext.get(path)
    assert status == 200 and hdrs.get(CACHE_HEADER) == "miss", (status, dict(hdrs))
    assert value_of(body) == "old-value"
    assert fake.calls(target, key) == 1

    fake.set_default("500")  # AWS is down from now on
    warns_before = len(warn_lines(ext.stderr()))
    status, hdrs, body = _first_non_hit(ext, path)
    assert status == 200, (status, body[:300])
    assert hdrs.get(CACHE_HEADER) == "stale", dict(hdrs)
    assert value_of(body) == "old-value"
    calls_after_first_stale = fake.calls(target, key)
    assert calls_after_first_stale > 1, "a stale answer must follow a real refresh attempt"
    wait_for(lambda: len(warn_lines(ext.stderr())) > warns_before, timeout=5,
             message="a WARN line about the stale answer")

    # The next request tries AWS again (and is again answered stale).
    status, hdrs, body = ext.get(path, timeout=20)
    assert status == 200 and hdrs.get(CACHE_HEADER) == "stale", (status, dict(hdrs))
    assert fake.calls(target, key) > calls_after_first_stale

    # AWS recovers with a new value: it shows at once and is cached again.
    fake.set_default("ok")
    if service == "ssm":
        fake.set_value(key, "new-value")
    else:
        fake.set_secret(key, string="new-value")
    status, hdrs, body = ext.get(path)
    assert status == 200 and hdrs.get(CACHE_HEADER) == "miss", (status, dict(hdrs))
    assert value_of(body) == "new-value"
    status, hdrs, body = ext.get(path)
    assert status == 200 and hdrs.get(CACHE_HEADER) == "hit", (status, dict(hdrs))
    assert value_of(body) == "new-value"


def test_max_stale_zero_turns_serving_stale_off(fake, start_extension):
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TTL": 1,
                                         "PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS": 0})
    assert ext.get(ssm_path("/nostale"))[0] == 200
    fake.set_default("500")
    status, hdrs, body = _first_non_hit(ext, ssm_path("/nostale"))
    assert status == 500, (status, dict(hdrs), body[:300])
    assert body_json(body).get("__type") == "InternalServerError"


def test_no_stale_answer_past_the_bound(fake, start_extension):
    # TTL 1 s + at most 2 s stale: the value may be served stale until ~3 s after it
    # was fetched, then the error must show.
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TTL": 1,
                                         "PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS": 2})
    assert ext.get(ssm_path("/bounded"))[0] == 200
    fake.set_default("503")
    status, hdrs, _ = _first_non_hit(ext, ssm_path("/bounded"))
    assert status == 200 and hdrs.get(CACHE_HEADER) == "stale", (status, dict(hdrs))

    def errored():
        got, hdrs, body = ext.get(ssm_path("/bounded"), timeout=20)
        if got == 200:
            assert hdrs.get(CACHE_HEADER) == "stale", dict(hdrs)
            return None
        return got, body

    got, body = wait_for(errored, timeout=15, interval=0.1,
                         message="the stale bound to run out")
    assert got == 503, (got, body[:300])
    assert body_json(body).get("__type") == "ServiceUnavailable"


@pytest.mark.parametrize("kind, error_type", [("notfound", "ParameterNotFound"),
                                              ("accessdenied", "AccessDeniedException")])
def test_never_stale_after_a_client_error(fake, start_extension, kind, error_type):
    # A deleted parameter or a revoked permission must show, not a stale value.
    ext = start_extension(fake.url, env={"SSM_PARAMETER_STORE_TTL": 1})
    assert ext.get(ssm_path("/revoked"))[0] == 200
    fake.set_default(kind)
    status, hdrs, body = _first_non_hit(ext, ssm_path("/revoked"))
    assert status == 400, (status, dict(hdrs), body[:300])
    assert body_json(body).get("__type") == error_type
    # And again on the next request (nothing stale was kept around for it).
    status, _, body = ext.get(ssm_path("/revoked"))
    assert status == 400 and body_json(body).get("__type") == error_type


# ---------------------------------------------------------------------- refreshNow


@pytest.mark.parametrize("flag", ["true", "1"])
def test_refresh_now_bypasses_and_stores_the_fresh_value(shared, key, flag):
    ext, fake = shared
    fake.set_value(key, "v1")
    status, hdrs, body = ext.get(ssm_path(key))
    assert status == 200 and json.loads(body)["Parameter"]["Value"] == "v1"
    fake.set_value(key, "v2")
    # Cached: still v1 without refreshNow.
    status, hdrs, body = ext.get(ssm_path(key))
    assert hdrs.get(CACHE_HEADER) == "hit" and json.loads(body)["Parameter"]["Value"] == "v1"
    assert fake.calls(name=key) == 1

    status, hdrs, body = ext.get(ssm_path(key, refreshNow=flag))
    assert status == 200, body[:300]
    assert json.loads(body)["Parameter"]["Value"] == "v2"
    # "miss", not "bypass": the fresh value is cached (bypass is for a TTL of 0).
    assert hdrs.get(CACHE_HEADER) == "miss", dict(hdrs)
    assert fake.calls(name=key) == 2

    # The fresh value was stored: a plain request is a hit with it.
    status, hdrs, body = ext.get(ssm_path(key))
    assert hdrs.get(CACHE_HEADER) == "hit", dict(hdrs)
    assert json.loads(body)["Parameter"]["Value"] == "v2"
    assert fake.calls(name=key) == 2


def test_refresh_now_on_secrets(shared, key):
    ext, fake = shared
    fake.set_secret(key, string="before")
    assert json.loads(ext.get(sm_path(key))[2])["SecretString"] == "before"
    fake.set_secret(key, string="after")
    assert json.loads(ext.get(sm_path(key))[2])["SecretString"] == "before"
    status, _, body = ext.get(sm_path(key, refreshNow="true"))
    assert status == 200 and json.loads(body)["SecretString"] == "after"
    status, hdrs, body = ext.get(sm_path(key))
    assert hdrs.get(CACHE_HEADER) == "hit" and json.loads(body)["SecretString"] == "after"
    assert fake.calls(SM_GET, key) == 2


@pytest.mark.parametrize("flag", ["false", "0"])
def test_refresh_now_false_uses_the_cache(shared, key, flag):
    ext, fake = shared
    assert ext.get(ssm_path(key))[0] == 200
    status, hdrs, _ = ext.get(ssm_path(key, refreshNow=flag))
    assert status == 200 and hdrs.get(CACHE_HEADER) == "hit", (status, dict(hdrs))
    assert fake.calls(name=key) == 1


@pytest.mark.parametrize("flag", ["yes", "2", "truee", "", "-1", "%00"])
def test_refresh_now_invalid_value_is_400(shared, key, flag):
    ext, fake = shared
    status, _, body = ext.get(ssm_path(key, refreshNow=flag))
    assert status == 400, (flag, status, body[:300])
    expected = "MalformedQuery" if flag == "%00" else "InvalidQueryValue"
    assert body_json(body).get("__type") == expected
    assert fake.calls(name=key) == 0


def test_concurrent_refresh_now_is_single_flight(shared, key):
    ext, fake = shared
    assert ext.get(ssm_path(key))[0] == 200
    fake.set_value(key, "rotated")
    fake.set_default(Do("ok", delay_ms=1000), name=key)
    results = _concurrent_gets(ext, ssm_path(key, refreshNow="true"), 16)
    assert [r[0] for r in results] == [200] * 16, results
    for r in results:
        assert json.loads(r[2])["Parameter"]["Value"] == "rotated"
    calls = fake.calls(name=key) - 1
    assert calls == 1, f"{calls} AWS calls for 16 concurrent refreshNow requests"


# ---------------------------------------------------------------------------- ping


def test_ping_needs_no_token(shared):
    ext, _ = shared
    status, hdrs, body = ext.get("/ping", token=None)
    assert status == 200
    assert body_json(body) == {"status": "ok"}
    assert "application/json" in hdrs.get("Content-Type", "")
