"""Bounds on what AWS (or whatever answers in its place) can make the extension do
(docs/pitfalls.md, "What a hostile or broken peer does").

Black-box: the real extension subprocess against ``fake_aws.FakeAWS`` (scripted per
name; see its docstring for the hostile kinds), ``fake_credentials.FakeCredentials``
(a container credentials endpoint that can stall) or moto. What is pinned
(docs/design.md, "Retries and budgets"; docs/http-api.md, "Errors", "AWS's errors" and
"refreshNow"):

* Answers over 1 MiB: an AWS answer over 1 MiB (1048576 bytes of body) is 502
  ``UpstreamInvalidResponse`` and is not read whole (declared Content-Length, chunked
  and close-delimited bodies alike); it is transient: retried (3 attempts in all), and
  a cached value is served stale (``X-Parameters-Secrets-Cache: stale``). A body of
  exactly 1 MiB is served.
* One deadline per attempt, covering connect, headers and body: with a 1000 ms budget
  and a body dripping at 10 bytes/s, the caller gets 504 ``UpstreamTimeout`` within
  1.2 s (both services). Without a budget each attempt ends after 10 s in all however
  the bytes drip (a drip then an ok answer: 200 after ~10 s). Requests waiting on
  another request's AWS call for the same key stop at their own deadline.
* Container credentials: one fetch has a total deadline of 2 s and never outlasts the
  request's budget. A silent or dripping endpoint with a 1000 ms budget: 504
  ``UpstreamTimeout`` within 1.2 s; without a budget: 502 ``CredentialsUnavailable``
  within ~2.5 s, not retried. An endpoint answering 500 or bad JSON: 502
  ``CredentialsUnavailable`` at once.
* Connections busy: waiting for one of ``PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS``
  outbound connections is not an AWS timeout and is not retried: 503
  ``ConnectionsBusy`` when none frees within the budget, and no AWS call for that
  request.
* Wrong shapes: a 200 answer of the wrong shape is 502 ``UpstreamInvalidResponse``,
  transient (retried: 3 calls when always bad; 200 when bad then ok; stale when
  cached), never a 500. Error answers whose body is deeply nested JSON or garbage give
  AWS's status with ``__type`` ``UnknownError``.
* Connection reuse, names: a connection to AWS is reused only after one complete,
  expected answer: after an interim ``103`` (read past), an unexpected status or bytes
  left over, no later answer may hold another name's value. An answer for another name than the
  one asked is 502 ``UpstreamInvalidResponse`` and not cached; names, ARNs and partial
  secret ARNs that do designate the one asked are accepted.
* Answers the grammar refuses (tests/test_grammar.py): 502 ``UpstreamInvalidResponse``,
  retried, stale when a value is cached; the connection that carried one is closed,
  never reused.
* refreshNow's rate: ``refreshNow=true`` makes at most one AWS call per second per key:
  a refreshNow less than 1 s after the previous refresh-made call gets that call's
  result (``X-Parameters-Secrets-Cache: hit``); the first refreshNow after an ordinary
  fetch always calls AWS; a 3 s loop makes at most 4 calls. A non-transient error on
  refresh (not found, access denied) drops the cached value.

Error bodies are always JSON ``{"__type": ..., "message": ...}`` (docs/http-api.md).
"""

import json
import re
import threading
import time
import urllib.parse

import pytest

import conftest
from conftest import SSM_GET, wait_for
from fake_aws import ACCOUNT, REGION, Do, FakeAWS, http_response
from fake_credentials import ACCESS_KEY_ID, FakeCredentials

CACHE_HEADER = "X-Parameters-Secrets-Cache"
MIB = 1024 * 1024
# Forever, for a 10 bytes/s drip: the test or the extension gives up long before.
FOREVER = 10 ** 6


def ssm_path(name, **query):
    parts = ["name=" + urllib.parse.quote(name, safe="")]
    parts += [f"{k}={v}" for k, v in query.items()]
    return "/systemsmanager/parameters/get?" + "&".join(parts)


def sm_path(secret_id, **query):
    parts = ["secretId=" + urllib.parse.quote(secret_id, safe="")]
    parts += [f"{k}={v}" for k, v in query.items()]
    return "/secretsmanager/get?" + "&".join(parts)


def path_for(service, name, **query):
    return ssm_path(name, **query) if service == "ssm" else sm_path(name, **query)


def value_of(service, body):
    parsed = json.loads(body)
    return parsed["Parameter"]["Value"] if service == "ssm" else parsed["SecretString"]


def error_of(body):
    """The error body, checked to be exactly {"__type": str, "message": str}."""
    try:
        parsed = json.loads(body)
    except ValueError:
        pytest.fail(f"error body is not JSON: {body[:300]!r}")
    assert isinstance(parsed, dict) and set(parsed) == {"__type", "message"}, parsed
    assert isinstance(parsed["__type"], str) and isinstance(parsed["message"], str), parsed
    return parsed


def timed_get(ext, path, limit, client_timeout=None):
    """GET path; (status, headers, body, seconds). Fails with a clear message when no
    answer came within client_timeout (default: limit + 2 s)."""
    client_timeout = client_timeout or limit + 2.0
    started = time.monotonic()
    try:
        status, headers, body = ext.get(path, timeout=client_timeout)
    except OSError as exc:
        pytest.fail(f"no answer within {client_timeout} s ({exc!r}); expected one within {limit} s")
    return status, headers, body, time.monotonic() - started


def vm_hwm_kib(pid):
    """Peak resident set size (VmHWM) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.fixture
def key(request):
    """A name no other test uses (the shared fakes script and count per name)."""
    return "/b/" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)


@pytest.fixture
def secret_key(request):
    return "b/" + re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)


class Shared:
    """A module-wide extension started with ``env`` and its own FakeAWS."""

    def __init__(self, tmp_path_factory, env):
        self.launcher = conftest.ExtensionLauncher(tmp_path_factory)
        self.fake = FakeAWS()
        self.ext = self.launcher(self.fake.url, env=env)

    def close(self):
        self.launcher.stop_all()
        self.fake.close()


def _shared_fixture(env):
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        shared = Shared(tmp_path_factory, env)
        yield shared
        shared.close()

    return fixture


# No budget: each attempt ends after 10 s at most, retries as AWS's SDKs do.
plain = _shared_fixture({"PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS": 256,
                         "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
# A 1000 ms budget on both services.
budget = _shared_fixture({"SSM_PARAMETER_STORE_TIMEOUT_MILLIS": 1000,
                          "SECRETS_MANAGER_TIMEOUT_MILLIS": 1000,
                          "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
# Values expire after 1 s: stale answers can be seen without long waits.
short_ttl = _shared_fixture({"SSM_PARAMETER_STORE_TTL": 1, "SECRETS_MANAGER_TTL": 1,
                             "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
# One connection per service: a connection that is reused is reused for sure.
one_connection = _shared_fixture({"PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS": 1,
                                  "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})


def first_non_hit(ext, path, timeout=10.0):
    """Poll ``path`` until the answer is not a cache hit (the 1 s TTL ran out)."""

    def probe():
        status, hdrs, body = ext.get(path, timeout=20)
        if status == 200 and hdrs.get(CACHE_HEADER) == "hit":
            return None
        return status, hdrs, body

    return wait_for(probe, timeout=timeout, interval=0.05, message="the TTL to run out")


# ------------------------------------------------------- answers over 1 MiB


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_answer_of_exactly_1_mib_is_served(plain, key, framing):
    ext, fake = plain.ext, plain.fake
    fake.script(Do("big", size=MIB, framing=framing), name=key)
    status, hdrs, body = ext.get(ssm_path(key), timeout=20)
    assert status == 200, body[:300]
    assert value_of("ssm", body) == "value-of-" + key
    assert fake.calls(name=key) == 1


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_answer_over_1_mib_is_502_after_3_attempts(plain, key, secret_key, service, framing):
    ext, fake = plain.ext, plain.fake
    name = key if service == "ssm" else secret_key
    # A fourth behaviour is queued: a client trying a fourth time would get a 200.
    fake.script(*[Do("big", size=MIB + 1, framing=framing)] * 3, "ok", name=name)
    status, _, body = ext.get(path_for(service, name), timeout=30)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=name) == 3
    # Transient, not cached: the next request calls again and gets the queued ok.
    status, _, body = ext.get(path_for(service, name), timeout=30)
    assert status == 200, body[:300]
    assert fake.calls(name=name) == 4


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_huge_answer_is_not_read_whole(plain, key, framing):
    # 64 MiB per attempt; the fake records whether it could write the whole body. A
    # client that stops at the cap and closes the connection makes the fake's writes
    # fail once the socket buffers are full: "complete" False. None means the fake is
    # still writing: the connection was neither read nor closed.
    ext, fake = plain.ext, plain.fake
    fake.set_default(Do("big", size=64 * MIB, framing=framing), name=key)
    status, _, body = ext.get(ssm_path(key), timeout=60)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=key) == 3

    def all_ended():
        records = fake.requests_for(key)
        return all(r["complete"] is not None for r in records) and records

    try:
        records = wait_for(all_ended, timeout=10, message="the fake to stop writing")
    except AssertionError:
        records = fake.requests_for(key)
        pytest.fail("the extension left an over-cap answer's connection open (neither read nor "
                    f"closed): sent/complete per attempt {[(r['sent'], r['complete']) for r in records]}")
    assert [r["complete"] for r in records] == [False] * 3, [r["sent"] for r in records]


def test_huge_answers_do_not_grow_memory(start_extension):
    # Three attempts of 64 MiB, in each framing. Read whole, the peak RSS would grow by
    # at least 64 MiB; capped at 1 MiB, by a few MiB at most. The bound leaves room for
    # allocator noise.
    with FakeAWS() as fake:
        ext = start_extension(fake.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
        before = vm_hwm_kib(ext.proc.pid)
        for framing in ("length", "chunked", "close"):
            name = "/huge/" + framing
            fake.set_default(Do("big", size=64 * MIB, framing=framing), name=name)
            status, _, body = ext.get(ssm_path(name), timeout=60)
            assert status == 502, (framing, body[:300])
        grown_mib = (vm_hwm_kib(ext.proc.pid) - before) / 1024
        assert grown_mib < 24, f"peak RSS grew by {grown_mib:.1f} MiB for 64 MiB answers"


def test_answer_over_1_mib_serves_stale(short_ttl, key):
    ext, fake = short_ttl.ext, short_ttl.fake
    fake.set_value(key, "cached-value")
    status, hdrs, body = ext.get(ssm_path(key))
    assert status == 200 and hdrs.get(CACHE_HEADER) == "miss", (status, dict(hdrs))
    fake.set_value(key, "new-value")
    fake.set_default(Do("big", size=MIB + 1, framing="chunked"), name=key)
    status, hdrs, body = first_non_hit(ext, ssm_path(key))
    assert status == 200, body[:300]
    assert hdrs.get(CACHE_HEADER) == "stale", dict(hdrs)
    assert value_of("ssm", body) == "cached-value"


# ------------------------------------------------------- one deadline per attempt


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_dripping_body_is_cut_at_the_budget(budget, key, secret_key, service):
    ext, fake = budget.ext, budget.fake
    name = key if service == "ssm" else secret_key
    # Status and headers at once, then 10 bytes a second: a per-read timeout never fires.
    fake.set_default(Do("drip", rate=10, size=FOREVER), name=name)
    status, _, body, elapsed = timed_get(ext, path_for(service, name), limit=1.2)
    assert status == 504, body[:300]
    assert error_of(body)["__type"] == "UpstreamTimeout"
    assert elapsed < 1.2, f"answered after {elapsed:.2f} s with a 1000 ms budget"
    assert 1 <= fake.calls(name=name) <= 3


def test_waiters_on_a_hanging_call_stop_at_their_own_deadline(budget, key):
    # One call per miss: the first request calls AWS, which hangs; the others, arriving
    # later, wait for that call, each only until its own 1000 ms deadline. (All share
    # one budget, so the first request's call ends before any waiter's deadline: this
    # pins the answer waiters see, 504 within 1.2 s, not which deadline ended the wait.)
    ext, fake = budget.ext, budget.fake
    fake.set_default("hang", name=key)
    results = {}

    def one(i):
        results[i] = timed_get(ext, ssm_path(key), limit=1.2)

    leader = threading.Thread(target=one, args=(0,), daemon=True)
    leader.start()
    wait_for(lambda: fake.calls(name=key) == 1, timeout=5, message="the leader's AWS call")
    followers = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(1, 5)]
    for t in followers:
        t.start()
    for t in [leader] + followers:
        t.join(10)
    assert sorted(results) == [0, 1, 2, 3, 4], results
    for i, (status, _, body, elapsed) in results.items():
        assert status == 504, (i, body[:300])
        assert error_of(body)["__type"] == "UpstreamTimeout"
        assert elapsed < 1.2, f"request {i} answered after {elapsed:.2f} s"
    assert 1 <= fake.calls(name=key) <= 3


@pytest.mark.slow
def test_without_budget_an_attempt_ends_after_10_seconds(plain, key):
    # The first attempt drips for ever; the second answers at once. Without a budget the
    # attempt still ends at ATTEMPT_TIMEOUT_WITHOUT_BUDGET (10 s) in all.
    ext, fake = plain.ext, plain.fake
    fake.script(Do("drip", rate=10, size=FOREVER), "ok", name=key)
    status, _, body, elapsed = timed_get(ext, ssm_path(key), limit=15.0, client_timeout=20.0)
    assert status == 200, body[:300]
    assert value_of("ssm", body) == "value-of-" + key
    assert fake.calls(name=key) == 2
    assert 9.5 <= elapsed < 15.0, f"answered after {elapsed:.2f} s"


# ------------------------------------------------------- container credentials


@pytest.fixture
def on_container_credentials(start_extension):
    """Factory: (extension, FakeAWS, FakeCredentials) with credentials only from the
    fake endpoint (mode as given) and the given extra env."""
    made = []

    def start(mode, **env):
        fake = FakeAWS()
        creds = FakeCredentials(mode)
        made.extend([fake, creds])
        ext = start_extension(fake.url, env=dict(
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
             "AWS_SESSION_TOKEN": None,
             "AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.url,
             "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-token",
             "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"}, **env))
        return ext, fake, creds

    yield start
    for thing in made:
        thing.close()


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_stalled_credentials_endpoint_within_budget(on_container_credentials, mode):
    ext, fake, creds = on_container_credentials(mode, SSM_PARAMETER_STORE_TIMEOUT_MILLIS=1000)
    status, _, body, elapsed = timed_get(ext, ssm_path("/creds/p"), limit=1.2)
    assert status == 504, body[:300]
    assert error_of(body)["__type"] == "UpstreamTimeout"
    assert elapsed < 1.2, f"answered after {elapsed:.2f} s with a 1000 ms budget"
    # The one fetch took the whole budget: no time was left for another.
    assert creds.count() == 1
    assert fake.calls() == 0


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_stalled_credentials_endpoint_without_budget(on_container_credentials, mode):
    ext, fake, creds = on_container_credentials(mode)
    status, _, body, elapsed = timed_get(ext, ssm_path("/creds/p"), limit=2.5, client_timeout=8)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "CredentialsUnavailable"
    assert elapsed < 2.5, f"answered after {elapsed:.2f} s; one fetch lasts 2 s at most"
    assert creds.count() == 1, "the credentials fetch was retried"
    assert fake.calls() == 0


@pytest.mark.parametrize("mode", ["500", "badjson"])
def test_broken_credentials_endpoint(on_container_credentials, mode):
    ext, fake, creds = on_container_credentials(mode)
    status, _, body, elapsed = timed_get(ext, ssm_path("/creds/p"), limit=2.0)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "CredentialsUnavailable"
    # "At once": well before the 2 s a fetch may last.
    assert elapsed < 1.5, f"answered after {elapsed:.2f} s"
    assert creds.count() == 1
    assert fake.calls() == 0
    assert b"container-token" not in body


def test_working_credentials_endpoint_signs_the_call(on_container_credentials):
    # The fake itself is sound: with an endpoint that answers, the value is served and
    # AWS sees a call signed with the endpoint's key.
    ext, fake, creds = on_container_credentials("ok", SSM_PARAMETER_STORE_TIMEOUT_MILLIS=1000)
    status, _, body = ext.get(ssm_path("/creds/ok"))
    assert status == 200, body[:300]
    assert value_of("ssm", body) == "value-of-/creds/ok"
    assert creds.authorizations == ["container-token"]
    auth = dict((k.lower(), v) for k, v in fake.requests[0]["headers"])["authorization"]
    assert f"Credential={ACCESS_KEY_ID}/" in auth, auth


# ------------------------------------------------------- connections busy


def test_a_request_waiting_for_the_only_connection_gets_it_when_it_frees(start_extension):
    # One connection, a 500 ms budget, a call that hangs. The hanging request's first
    # attempt ends at half its budget and frees the connection; a request for another
    # name made meanwhile gets it then, well within its own budget, and is answered.
    # (Waiting past one's own deadline is 503 ConnectionsBusy, never retried: with one
    # budget per service the holder always lets go first, so that case is unit-tested in
    # tests/test_policy.py.)
    with FakeAWS() as fake:
        ext = start_extension(fake.url, env={
            "PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS": 1,
            "SSM_PARAMETER_STORE_TIMEOUT_MILLIS": 500,
            "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
        fake.set_default("hang", name="/busy/hog")
        hog = {}
        thread = threading.Thread(
            target=lambda: hog.update(answer=ext.get(ssm_path("/busy/hog"), timeout=10)),
            daemon=True)
        thread.start()
        wait_for(lambda: fake.calls(name="/busy/hog") == 1, timeout=5,
                 message="the hanging call to hold the only connection")
        status, _, body, elapsed = timed_get(ext, ssm_path("/busy/other"), limit=1.0)
        thread.join(10)
        assert status == 200, body[:300]
        assert fake.calls(name="/busy/other") == 1
        assert hog["answer"][0] == 504


# ------------------------------------------------------- wrong shapes


def _param(**changes):
    """A callable for Do("payload"): the ok answer with Parameter fields changed
    (a value of ... removes the field)."""

    def change(ok):
        parameter = dict(ok["Parameter"])
        for field, value in changes.items():
            if value is ...:
                parameter.pop(field, None)
            else:
                parameter[field] = value
        return json.dumps({"Parameter": parameter}).encode()

    return change


def _secret(**changes):
    def change(ok):
        answer = dict(ok)
        for field, value in changes.items():
            if value is ...:
                answer.pop(field, None)
            else:
                answer[field] = value
        return json.dumps(answer).encode()

    return change


def _raw_param(field, literal):
    """The ok answer with one Parameter field replaced by raw JSON text (NaN, 1e300)."""

    def change(ok):
        text = json.dumps({"Parameter": dict(ok["Parameter"], **{field: "__RAW__"})})
        return text.replace('"__RAW__"', literal).encode()

    return change


BAD_PARAMETER_ANSWERS = {
    "null": b"null",
    "list": b"[]",
    "string": b'"x"',
    "empty-object": b"{}",
    "parameter-null": b'{"Parameter": null}',
    "name-not-text": _param(Name=5),
    "value-not-text": _param(Value=5),
    "value-missing": _param(Value=...),
    "version-text": _param(Version="1"),
    "version-bool": _param(Version=True),
    "version-float": _param(Version=1.5),
    "date-1e300": _raw_param("LastModifiedDate", "1e300"),
    "date-negative": _param(LastModifiedDate=-1),
    "date-text": _param(LastModifiedDate="yesterday"),
    "date-nan": _raw_param("LastModifiedDate", "NaN"),
    "deep-nesting": b"[" * 100000,
    "deep-nesting-inside": lambda ok: b'{"Parameter": ' + b"[" * 100000,
    "not-json": b"<html><body>Service Unavailable</body></html>",
    "not-utf8": b'{"Parameter": {"Name": "\xff\xfe"}}',
}

BAD_SECRET_ANSWERS = {
    "null": b"null",
    "list": b"[]",
    "name-missing": _secret(Name=...),
    "arn-missing": _secret(ARN=...),
    "string-not-text": _secret(SecretString=5),
    "stages-not-list": _secret(VersionStages="AWSCURRENT"),
    "stages-not-text": _secret(VersionStages=[1]),
    "date-absurd": _secret(CreatedDate=1e300),
    "date-text": _secret(CreatedDate="yesterday"),
    "no-value": _secret(SecretString=...),
    "deep-nesting": b"[" * 100000,
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMETER_ANSWERS))
def test_parameter_answer_of_the_wrong_shape_is_502(plain, key, case):
    ext, fake = plain.ext, plain.fake
    fake.set_default(Do("payload", body=BAD_PARAMETER_ANSWERS[case]), name=key)
    status, _, body = ext.get(ssm_path(key), timeout=30)
    assert status == 502, (case, status, body[:300])
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=key) == 3
    assert ext.alive()


@pytest.mark.parametrize("case", sorted(BAD_SECRET_ANSWERS))
def test_secret_answer_of_the_wrong_shape_is_502(plain, secret_key, case):
    ext, fake = plain.ext, plain.fake
    fake.set_default(Do("payload", body=BAD_SECRET_ANSWERS[case]), name=secret_key)
    status, _, body = ext.get(sm_path(secret_key), timeout=30)
    assert status == 502, (case, status, body[:300])
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=secret_key) == 3


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_wrong_shape_then_ok_is_retried(plain, key, secret_key, service):
    ext, fake = plain.ext, plain.fake
    name = key if service == "ssm" else secret_key
    fake.script(Do("payload", body=b"{}"), "ok", name=name)
    status, _, body = ext.get(path_for(service, name), timeout=30)
    assert status == 200, body[:300]
    assert value_of(service, body) == "value-of-" + name
    assert fake.calls(name=name) == 2


def test_wrong_shape_serves_stale(short_ttl, key):
    ext, fake = short_ttl.ext, short_ttl.fake
    fake.set_value(key, "cached-value")
    assert ext.get(ssm_path(key))[0] == 200
    fake.set_default(Do("payload", body=_param(Version="2")), name=key)
    status, hdrs, body = first_non_hit(ext, ssm_path(key))
    assert status == 200, body[:300]
    assert hdrs.get(CACHE_HEADER) == "stale", dict(hdrs)
    assert value_of("ssm", body) == "cached-value"


ERROR_BODIES = {
    "deep-nesting": b"[" * 100000,
    "deep-object": b'{"__type": ' * 50000,
    "garbage": b"\xff\xfe\x00garbage<<<",
    "html": b"<html><body>Bad Gateway</body></html>",
    "type-not-text": b'{"__type": {"x": 1}, "message": 5}',
}


@pytest.mark.parametrize("status", [400, 503])
@pytest.mark.parametrize("case", sorted(ERROR_BODIES))
def test_error_answer_with_a_bad_body_is_a_clean_error(plain, key, status, case):
    ext, fake = plain.ext, plain.fake
    fake.set_default(Do("payload", status=status, body=ERROR_BODIES[case]), name=key)
    got, _, body = ext.get(ssm_path(key), timeout=30)
    assert got == status, (case, got, body[:300])
    assert error_of(body)["__type"] == "UnknownError"
    # A 400 that is not a throttle is final; a 503 is retried (3 attempts in all).
    assert fake.calls(name=key) == (1 if status == 400 else 3)


# ------------------------------------------------------- connection reuse, names


def _no_foreign_values(answers):
    """Each (asked name, status, body): a 200 holds the asked name's value, nothing else."""
    for asked, status, body in answers:
        if status == 200:
            assert value_of("ssm", body) == "value-of-" + asked, (asked, body[:300])
            assert json.loads(body)["Parameter"]["Name"] == asked, (asked, body[:300])


def _sequence(ext, fake, names):
    """GET each name in turn, each after the fake finished answering every call so far
    (so bytes left over by a broken answer are already on the connection)."""
    answers = []
    for name in names:
        assert fake.wait_done(len(fake.requests), timeout=10)
        status, _, body = ext.get(ssm_path(name), timeout=30)
        answers.append((name, status, body))
    return answers


def _answered_by_one_call(fake, names):
    # A connection left out of step would hand the next request the previous answer:
    # refused (it names another parameter) and retried, a second call. One call each
    # means every request after the broken answer read its own.
    assert [fake.calls(name=name) for name in names] == [1] * len(names), \
        [fake.calls(name=name) for name in names]


def test_early_hints_never_desynchronise_the_connection(one_connection, key):
    ext, fake = one_connection.ext, one_connection.fake
    a, b, c = key + "/a", key + "/b", key + "/c"
    fake.script(Do("early_hints"), name=a)
    answers = _sequence(ext, fake, [a, b, c, a])
    _no_foreign_values(answers)
    # The 103 is read past (RFC 9110 section 15.2): /a is answered by its one call (the
    # 200 that follows; asked again, it is a cache hit), and the connection, in step,
    # serves the next requests.
    assert [status for _, status, _ in answers] == [200, 200, 200, 200], answers
    _answered_by_one_call(fake, [a, b, c])


def _smuggled_answer_for(fake, name):
    """A complete 200 answer for ``name`` with a value AWS never gave it: what a reused
    connection that is out of step would hand the request for ``name``."""
    body = json.loads(fake.ok_answer(name))
    body["Parameter"]["Value"] = "smuggled-value"
    return http_response(200, body)


def test_bytes_left_over_never_reach_the_next_answer(one_connection, key):
    ext, fake = one_connection.ext, one_connection.fake
    a, b = key + "/a", key + "/b"
    # /a's own answer, complete and correct; 200 ms later, on the same connection, an
    # answer nobody asked for, naming the parameter asked next.
    fake.script(Do("raw", data=[lambda ok: http_response(200, ok), _smuggled_answer_for(fake, b)]),
                name=a)
    answers = _sequence(ext, fake, [a, b, b + "2"])
    _no_foreign_values(answers)
    assert [status for _, status, _ in answers] == [200, 200, 200], answers
    _answered_by_one_call(fake, [a, b, b + "2"])


def test_unexpected_status_never_desynchronises_the_connection(one_connection, key):
    ext, fake = one_connection.ext, one_connection.fake
    a, b = key + "/a", key + "/b"
    smuggled = _smuggled_answer_for(fake, b)
    # A 204 may not have a body, so a client does not read the one that follows.
    head = b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    fake.script(Do("raw", data=[head, smuggled]), name=a)
    answers = _sequence(ext, fake, [a, b, b + "2"])
    _no_foreign_values(answers)
    # /a: the 204 is an answer GetParameter never gives (UpstreamInvalidResponse,
    # transient), so it is retried on a new connection, which answers.
    assert [status for _, status, _ in answers] == [200, 200, 200], answers
    assert fake.calls(name=a) == 2
    _answered_by_one_call(fake, [b, b + "2"])


# Answers the grammar refuses (tests/test_grammar.py has them all), each a complete
# answer that would parse once as a 200 with the right value by a laxer client.
REFUSED_ANSWERS = {
    "content-length-and-chunked": lambda ok: (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                                              b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                                              % (len(ok), len(ok), ok)),
    "two-content-lengths": lambda ok: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: 1\r\n\r\n%s"
                                      % (len(ok), ok),
    "chunk-size-0x": lambda ok: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x%x\r\n%s\r\n0\r\n\r\n"
                                 % (len(ok), ok)),
    "status-2000": lambda ok: b"HTTP/1.1 2000 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ok), ok),
    "gzip-chunked": lambda ok: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                                % (len(ok), ok)),
}


@pytest.mark.parametrize("case", sorted(REFUSED_ANSWERS))
def test_an_answer_the_grammar_refuses_is_502_and_its_connection_never_reused(one_connection, key, case):
    ext, fake = one_connection.ext, one_connection.fake
    fake.script(*[Do("raw", data=REFUSED_ANSWERS[case])] * 3, name=key)
    status, _, body = ext.get(ssm_path(key), timeout=30)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=key) == 3  # retried, as any invalid answer is
    # The next request, on the one connection allowed, is answered on a new one: none
    # that carried a refused answer was kept (the fake keeps each open).
    status, _, body = ext.get(ssm_path(key), timeout=30)
    assert status == 200, body[:300]
    ports = [record["client_port"] for record in fake.requests_for(key)]
    assert len(ports) == 4 and len(set(ports)) == 4, ports


def test_an_answer_the_grammar_refuses_serves_stale(short_ttl, key):
    ext, fake = short_ttl.ext, short_ttl.fake
    fake.set_value(key, "cached-value")
    assert ext.get(ssm_path(key))[0] == 200
    fake.set_default(Do("raw", data=REFUSED_ANSWERS["content-length-and-chunked"]), name=key)
    status, hdrs, body = first_non_hit(ext, ssm_path(key))
    assert status == 200, body[:300]
    assert hdrs.get(CACHE_HEADER) == "stale", dict(hdrs)
    assert value_of("ssm", body) == "cached-value"


def _for_another_parameter(other):
    def change(ok):
        parameter = dict(ok["Parameter"], Name=other, Value="value-of-" + other,
                         ARN=f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{other}")
        return {"Parameter": parameter}

    return change


def _for_another_secret(other):
    def change(ok):
        return dict(ok, Name=other, SecretString="value-of-" + other,
                    ARN=f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{other}-XyZ123")

    return change


@pytest.mark.parametrize("service", ["ssm", "secretsmanager"])
def test_answer_for_another_name_is_502_and_not_cached(plain, key, secret_key, service):
    ext, fake = plain.ext, plain.fake
    name = key if service == "ssm" else secret_key
    other = name + "-other"
    wrong = _for_another_parameter(other) if service == "ssm" else _for_another_secret(other)
    fake.script(*[Do("payload", body=wrong)] * 3, name=name)
    status, _, body = ext.get(path_for(service, name), timeout=30)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"
    assert fake.calls(name=name) == 3
    # Nothing was cached: the next request calls AWS (ok now) and gets its own value.
    status, hdrs, body = ext.get(path_for(service, name))
    assert status == 200, body[:300]
    assert value_of(service, body) == "value-of-" + name
    assert fake.calls(name=name) == 4


def test_parameter_arn_asked_with_name_answered_for_another_is_502(plain, key):
    ext, fake = plain.ext, plain.fake
    arn = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{key}"
    fake.set_default(Do("payload", body=_for_another_parameter(key + "-other")), name=arn)
    status, _, body = ext.get(ssm_path(arn), timeout=30)
    assert status == 502, body[:300]
    assert error_of(body)["__type"] == "UpstreamInvalidResponse"


ARN_SSM = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter"


@pytest.mark.parametrize("asked, answered_name", [
    ("/acc/p", "/acc/p"),                                  # Name == asked
    (ARN_SSM + "/acc/p", "/acc/p"),                         # ARN asked, ":parameter" + Name
    (ARN_SSM + "/acc-q", "acc-q"),                          # ARN asked, "/" + Name
], ids=["name", "arn-with-slash-name", "arn-of-name-without-slash"])
def test_parameter_answers_for_the_name_asked_are_served(plain, asked, answered_name):
    ext, fake = plain.ext, plain.fake

    def answer(ok):
        return {"Parameter": dict(ok["Parameter"], Name=answered_name,
                                  ARN=ARN_SSM + "/" + answered_name.lstrip("/"))}

    fake.set_default(Do("payload", body=answer), name=asked)
    status, _, body = ext.get(ssm_path(asked))
    assert status == 200, body[:300]
    assert json.loads(body)["Parameter"]["Name"] == answered_name


def test_parameter_with_selector_is_served(plain, key):
    # The name sent is "<name>:1"; AWS answers with Name "<name>" and Selector ":1".
    ext = plain.ext
    status, _, body = ext.get(ssm_path(key, version="1"))
    assert status == 200, body[:300]
    parsed = json.loads(body)["Parameter"]
    assert (parsed["Name"], parsed["Selector"]) == (key, ":1")


ARN_SM = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:"


@pytest.mark.parametrize("asked", ["acc/s", ARN_SM + "acc/s-AbC123", ARN_SM + "acc/s"],
                         ids=["name", "full-arn", "partial-arn"])
def test_secret_answers_for_the_id_asked_are_served(plain, asked):
    ext = plain.ext
    status, _, body = ext.get(sm_path(asked))
    assert status == 200, body[:300]
    parsed = json.loads(body)
    assert parsed["Name"] == "acc/s"
    assert parsed["ARN"] == (asked if asked.endswith("-AbC123") else ARN_SM + "acc/s-AbCdEf")


# ------------------------------------------------------- refreshNow's rate


def test_refresh_now_loop_makes_at_most_4_calls_in_3_seconds(plain, key):
    ext, fake = plain.ext, plain.fake
    assert ext.get(ssm_path(key))[0] == 200
    before = fake.calls(name=key)
    conn = ext.connection(timeout=10)
    requests = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            status, _, body = ext.request_on(conn, "GET", ssm_path(key, refreshNow="true"))
            assert status == 200, body[:300]
            assert value_of("ssm", body) == "value-of-" + key
            requests += 1
    finally:
        conn.close()
    calls = fake.calls(name=key) - before
    # One call at once (the first refreshNow after an ordinary fetch), then one a
    # second: 3 calls, or 4 if the loop ran a hair past 3 s.
    assert 3 <= calls <= 4, f"{calls} AWS calls for {requests} refreshNow requests in 3 s"


def test_refresh_now_within_a_second_gets_the_last_refresh(plain, key):
    ext, fake = plain.ext, plain.fake
    fake.set_value(key, "v1")
    status, hdrs, body = ext.get(ssm_path(key))
    assert value_of("ssm", body) == "v1" and fake.calls(name=key) == 1
    fake.set_value(key, "v2")
    # The first refreshNow after an ordinary fetch always calls AWS.
    status, hdrs, body = ext.get(ssm_path(key, refreshNow="true"))
    refreshed = time.monotonic()
    assert status == 200 and value_of("ssm", body) == "v2", body[:300]
    assert fake.calls(name=key) == 2
    fake.set_value(key, "v3")
    status, hdrs, body = ext.get(ssm_path(key, refreshNow="true"))
    if time.monotonic() - refreshed < 0.9:  # a stalled machine must not fail the test
        assert status == 200, body[:300]
        assert hdrs.get(CACHE_HEADER) == "hit", dict(hdrs)
        assert value_of("ssm", body) == "v2"
        assert fake.calls(name=key) == 2

    # A second on, refreshNow calls AWS again.
    def refreshed_to_v3():
        status, _, body = ext.get(ssm_path(key, refreshNow="true"))
        return status == 200 and value_of("ssm", body) == "v3"

    wait_for(refreshed_to_v3, timeout=5, interval=0.1, message="a refresh a second later")
    assert fake.calls(name=key) == 3


def test_first_refresh_after_an_ordinary_fetch_calls_aws(plain, key):
    ext, fake = plain.ext, plain.fake
    assert ext.get(ssm_path(key))[0] == 200
    status, hdrs, _ = ext.get(ssm_path(key, refreshNow="true"))
    assert status == 200
    assert hdrs.get(CACHE_HEADER) != "hit", dict(hdrs)
    assert fake.calls(name=key) == 2


def test_refresh_after_delete_drops_the_cached_value(moto, ssm, counting_proxy, start_extension):
    ssm.put_parameter(Name="/refresh/deleted", Value="soon-gone", Type="String")
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
    status, _, body = ext.get(ssm_path("/refresh/deleted"))
    assert status == 200 and value_of("ssm", body) == "soon-gone"
    ssm.delete_parameter(Name="/refresh/deleted")
    status, _, body = ext.get(ssm_path("/refresh/deleted", refreshNow="true"))
    assert status == 400, body[:300]
    assert json.loads(body)["__type"] == "ParameterNotFound"
    calls = proxy.count(SSM_GET)
    # Not a hit: the deleted value is gone from the cache, so AWS is asked again.
    status, hdrs, body = ext.get(ssm_path("/refresh/deleted"))
    assert status == 400, (dict(hdrs), body[:300])
    assert json.loads(body)["__type"] == "ParameterNotFound"
    assert proxy.count(SSM_GET) == calls + 1


@pytest.mark.parametrize("kind, error_type", [("notfound", "ResourceNotFoundException"),
                                              ("accessdenied", "AccessDeniedException")])
def test_refresh_client_error_drops_the_cached_secret(plain, secret_key, kind, error_type):
    ext, fake = plain.ext, plain.fake
    assert ext.get(sm_path(secret_key))[0] == 200
    fake.script(kind, name=secret_key)
    status, _, body = ext.get(sm_path(secret_key, refreshNow="true"))
    assert status == 400, body[:300]
    assert json.loads(body)["__type"] == error_type
    # The next plain request is not served from the cache: it calls AWS (ok again).
    status, hdrs, body = ext.get(sm_path(secret_key))
    assert status == 200, body[:300]
    assert hdrs.get(CACHE_HEADER) == "miss", dict(hdrs)
    assert fake.calls(name=secret_key) == 3


def test_no_hostile_answer_was_an_internal_error(plain):
    # Runs last in the module: after every hostile case above, the shared extension
    # still serves, and none of them made it fail inside ("internal error" is the log
    # line of a 500 of its own).
    status, _, body = plain.ext.get(ssm_path("/b/still-serving"))
    assert status == 200, body[:300]
    internal = [line for line in plain.ext.logs().splitlines() if "internal error" in line]
    assert internal == [], internal
