"""What a request means, decided by Service.answer without a socket: the token and its
header rules, forwarding refusals, what an error body may echo, what is logged, the
retry budget on a fake clock, the checks on AWS's answers, and the drop after a
snapshot restore.

The AWS side is a stub standing in for ServiceClient.call: it hands the render function
a wire answer the test chooses, as the real client does after its HTTP exchange.
"""

import json

import pytest

import extension
from conftest import UNIT_TOKEN, FakeClock, RecordingLog, stand_in, unit_service

TOKEN = UNIT_TOKEN
PARAMETER_ANSWER = {"Parameter": {"Name": "/app/p", "Type": "String", "Value": "the-value", "Version": 3,
                                  "ARN": "arn:aws:ssm:us-east-1:123456789012:parameter/app/p",
                                  "LastModifiedDate": 1668586960.362, "DataType": "text"}}
SECRET_ANSWER = {"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:app/s-AbCdEf", "Name": "app/s",
                 "VersionId": "v1", "SecretString": "s3cr3t", "VersionStages": ["AWSCURRENT"],
                 "CreatedDate": 1668586960.362}


class StubClient:
    """Answers every call with answers[0] (or raises it), counting calls."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def call(self, target, payload, deadline, render):
        self.calls.append((target, payload, deadline))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return render(answer)

    def close_idle(self):
        pass


def make_service(env=None, ssm=None, secrets=None):
    return unit_service(env, ssm=ssm or StubClient(PARAMETER_ANSWER),
                        secretsmanager=secrets or StubClient(SECRET_ANSWER))


def answer(service, target, headers=None, method="GET"):
    if headers is None:
        headers = [("x-aws-parameters-secrets-token", TOKEN)]
    status, extra, body = service.answer(method, target, headers)
    return status, dict(extra), json.loads(body)


PARAMETER = "/systemsmanager/parameters/get?name=/app/p"


# ------------------------------------------------------------------ the request


def test_a_parameter_is_answered_and_then_a_hit():
    service, _, _, _ = make_service()
    status, headers, body = answer(service, PARAMETER)
    assert (status, headers["X-Parameters-Secrets-Cache"], body["Parameter"]["Value"]) == (200, "miss", "the-value")
    assert body["Parameter"]["LastModifiedDate"] == "2022-11-16T08:22:40.362Z"
    assert answer(service, PARAMETER)[1]["X-Parameters-Secrets-Cache"] == "hit"
    assert len(service.clients["ssm"].calls) == 1


@pytest.mark.parametrize("tokens", [[TOKEN, "wrong"], ["wrong", TOKEN], [TOKEN, TOKEN]])
def test_a_repeated_token_header_is_400_whatever_the_order(tokens):
    service, _, _, _ = make_service()
    status, _, body = answer(service, PARAMETER, [("x-aws-parameters-secrets-token", t) for t in tokens])
    assert (status, body["__type"]) == (400, "RepeatedHeader")
    assert service.clients["ssm"].calls == []


@pytest.mark.parametrize("name", ["x-forwarded-for", "forwarded"])
def test_forwarded_requests_are_refused_even_for_ping(name):
    service, _, _, _ = make_service()
    for target in (PARAMETER, "/ping"):
        status, _, body = answer(service, target, [(name, "for=192.0.2.1"), ("x-aws-parameters-secrets-token", TOKEN)])
        assert (status, body["__type"]) == (400, "ForwardedRequestRefused")


def test_other_methods_are_405_with_allow():
    service, _, _, _ = make_service()
    status, headers, body = answer(service, PARAMETER, method="DELETE")
    assert (status, headers, body["__type"]) == (405, {"Allow": "GET"}, "MethodNotAllowed")


def test_missing_and_wrong_tokens():
    service, _, _, _ = make_service()
    assert answer(service, PARAMETER, [])[2]["__type"] == "MissingToken"
    assert answer(service, PARAMETER, [("x-aws-parameters-secrets-token", "nope")])[0] == 403
    assert answer(service, "/ping", [])[0] == 200


def test_an_unknown_key_is_echoed_cut_to_16_characters():
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"})
    status, _, body = answer(service, "/systemsmanager/parameters/get?name=/a&withdecryptionplease=true")
    assert status == 400
    assert body == {"__type": "UnknownQueryKey",
                    "message": "unknown query key 'withdecryptionpl\u2026'; did you mean 'withDecryption'?"}
    assert "withdecryptionplease" not in repr(log.lines)


@pytest.mark.parametrize("key", [TOKEN, "x" + TOKEN + "y", TOKEN[5:30]])
def test_a_key_that_looks_like_the_token_is_refused_and_never_echoed(key):
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"})
    status, _, body = answer(service, f"/systemsmanager/parameters/get?name=/a&{key}=1")
    assert (status, body["__type"]) == (400, "TokenInQuery")
    assert TOKEN[5:21] not in json.dumps(body) and TOKEN[5:21] not in repr(log.lines)


def test_a_path_holding_the_token_is_logged_without_it():
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"})
    status, _, body = answer(service, f"/{TOKEN}/get")
    assert (status, body["__type"]) == (404, "NotFound")
    assert log.lines[-1] == ("debug", "a request -> 404 NotFound (the rest withheld: it quotes the request token)")


def test_an_upstream_message_quoting_the_token_is_withheld():
    ssm = StubClient(extension.AwsError(400, "ValidationException", f"the security token {TOKEN} is bad"))
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"}, ssm=ssm)
    status, _, body = answer(service, PARAMETER)
    assert (status, body) == (400, {"__type": "ValidationException",
                                    "message": "(message withheld: it quoted the request token)"})
    assert TOKEN not in repr(log.lines)


NAME_LIKE = [
    ("/systemsmanager/parameters/get", "name", "{}"),
    ("/systemsmanager/parameters/get", "name", "/app/{}/db"),
    ("/systemsmanager/parameters/get-multiple", "names", "/a,{}"),
    ("/systemsmanager/parameters/get-by-path", "path", "/{}/"),
    ("/secretsmanager/get", "secretId", "{}"),
    ("/secretsmanager/batch-get", "secretIds", "a,prefix-{}-suffix"),
    ("/systemsmanager/parameters/get", "jsonKey", "{}"),
    ("/secretsmanager/get", "versionStage", "{}"),
]


@pytest.mark.parametrize("route, key, value", NAME_LIKE)
@pytest.mark.parametrize("encoded", [False, True])
def test_a_query_value_holding_the_token_is_refused_before_any_aws_call(route, key, value, encoded):
    """A token pasted as a name (swapped arguments) must not reach AWS, whose request
    logs keep the names asked: refused with 400 before any call, percent-encoded or not,
    nothing cached, nothing of it echoed or logged."""
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"})
    text = value.format(TOKEN)
    if encoded:
        text = "".join(f"%{byte:02X}" for byte in text.encode())
    first = "" if key in ("name", "names", "path", "secretId", "secretIds") else (
        "name=/app/p&" if "systemsmanager" in route else "secretId=app/s&")
    status, _, body = answer(service, f"{route}?{first}{key}={text}")
    assert (status, body["__type"]) == (400, "TokenInQuery")
    assert TOKEN not in json.dumps(body) and TOKEN[:16] not in json.dumps(body)
    assert service.clients["ssm"].calls == [] and service.clients["secretsmanager"].calls == []
    assert len(service.store.cache) == 0
    assert TOKEN not in repr(log.lines) and TOKEN[:16] not in repr(log.lines)


def test_a_short_local_token_is_not_looked_for_in_values():
    # AWS_TOKEN=p for a local run would be found in nearly any name: only tokens of 8
    # characters or more are looked for (Lambda's session tokens are hundreds long).
    service, _, _, _ = unit_service({"AWS_TOKEN": "p"}, ssm=StubClient(PARAMETER_ANSWER))
    status, _, body = answer(service, "/systemsmanager/parameters/get?name=/app/p",
                             [("x-aws-parameters-secrets-token", "p")])
    assert status == 200, body


def test_a_failed_request_logs_the_name_at_debug():
    ssm = StubClient(extension.AwsError(400, "ParameterNotFound", ""))
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"}, ssm=ssm)
    answer(service, "/systemsmanager/parameters/get?name=/app/missing")
    assert log.lines[-1] == ("debug", "GET /systemsmanager/parameters/get (ssm '/app/missing') -> "
                                      "400 ParameterNotFound: ParameterNotFound (400)")


@pytest.mark.parametrize("escaped", ["%1B", "%7F", "%C2%9B"])  # ESC, DEL, and U+009B: CSI
def test_a_query_holding_a_control_character_is_refused_before_any_call(escaped):
    ssm = StubClient(extension.AwsError(400, "ParameterNotFound", ""))
    service, _, _, log = make_service({"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug"}, ssm=ssm)
    status, _, body = answer(service, f"/systemsmanager/parameters/get?name=/app/{escaped}31m")
    assert (status, body) == (400, {"__type": "MalformedQuery", "message": "the query holds a control character"})
    assert ssm.calls == []
    # What is logged of it is escaped (Logging: shown), so the raw character never is.
    assert not any(character in message for _, message in log.lines for character in "\x1b\x7f\x9b")
    assert extension.shown("/app/\x1b[31m\x9b31m") == "/app/\\x1b[31m\\x9b31m"


def test_an_internal_error_is_a_500_whose_log_line_says_where():
    class Broken(StubClient):
        def call(self, *args):
            raise KeyError("a value that must not be logged")

    service, _, _, log = make_service(ssm=Broken())
    status, _, body = answer(service, PARAMETER)
    assert (status, body["__type"]) == (500, "InternalError")
    level, message = log.lines[-1]
    assert level == "error"
    assert message.startswith("internal error: KeyError at test_policy.py:")
    assert message.endswith(" in call")
    assert "must not be logged" not in message


# ------------------------------------------------------------------ AWS's answers


@pytest.mark.parametrize("wire", [
    None, [], "x", {}, {"Parameter": None}, {"Parameter": []},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Name=5)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Value=None)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Value={"a": 1})},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Version="3")},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Version=True)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Version=-1)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Type="Other")},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], LastModifiedDate=1e300)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], LastModifiedDate=-1)},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], LastModifiedDate=float("nan"))},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], LastModifiedDate="yesterday")},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], ARN=["x"])},
    {"Parameter": dict(PARAMETER_ANSWER["Parameter"], Name="/app/other",
                       ARN="arn:aws:ssm:us-east-1:123456789012:parameter/app/other")},
])
def test_a_parameter_answer_of_the_wrong_shape_or_name_is_invalid(wire):
    with pytest.raises(extension.UpstreamInvalidResponse):
        extension.render_parameter(wire, "/app/p", None)


@pytest.mark.parametrize("asked, name, arn", [
    ("/app/p", "/app/p", "arn:aws:ssm:us-east-1:1:parameter/app/p"),
    ("/app/p:3", "/app/p", "arn:aws:ssm:us-east-1:1:parameter/app/p"),
    ("/app/p:prod", "/app/p", "arn:aws:ssm:us-east-1:1:parameter/app/p"),
    ("p", "p", "arn:aws:ssm:us-east-1:1:parameter/p"),
    ("arn:aws:ssm:us-east-1:1:parameter/app/p", "/app/p", "arn:aws:ssm:us-east-1:1:parameter/app/p"),
    ("arn:aws:ssm:us-east-1:1:parameter/p", "p", "arn:aws:ssm:us-east-1:1:parameter/p"),
    ("arn:aws:ssm:us-east-1:1:parameter/app/p:2", "/app/p", "arn:aws:ssm:us-east-1:1:parameter/app/p"),
    ("arn:aws:ssm:us-east-1:2:parameter/shared", "arn:aws:ssm:us-east-1:2:parameter/shared", ""),
    # AWS names a Secrets Manager reference by its path; moto by the secret's name.
    ("/aws/reference/secretsmanager/app/db", "/aws/reference/secretsmanager/app/db", ""),
    ("/aws/reference/secretsmanager/app/db", "app/db", ""),
])
def test_parameter_names_that_match(asked, name, arn):
    assert extension.parameter_names_match(asked, name, arn)


@pytest.mark.parametrize("asked, name, arn", [
    ("/app/p", "/app/q", "arn:aws:ssm:us-east-1:1:parameter/app/q"),
    ("/app/p:3", "/app/p:4", ""),
    ("arn:aws:ssm:us-east-1:1:parameter/app/p", "/app/q", "arn:aws:ssm:us-east-1:1:parameter/app/q"),
])
def test_parameter_names_that_do_not_match(asked, name, arn):
    assert not extension.parameter_names_match(asked, name, arn)


@pytest.mark.parametrize("asked, expected", [
    ("app/s", True), (SECRET_ANSWER["ARN"], True),
    ("arn:aws:secretsmanager:us-east-1:123456789012:secret:app/s", True),   # partial ARN
    ("app/t", False), ("arn:aws:secretsmanager:us-east-1:123456789012:secret:app", False),
])
def test_secret_ids(asked, expected):
    assert extension.secret_ids_match(asked, SECRET_ANSWER["Name"], SECRET_ANSWER["ARN"]) is expected


@pytest.mark.parametrize("change", [
    {"Name": None}, {"ARN": 7}, {"VersionId": None}, {"SecretString": 5},
    {"SecretString": None, "SecretBinary": None}, {"VersionStages": "AWSCURRENT"},
    {"VersionStages": [1]}, {"CreatedDate": 1e300}, {"Name": "other", "ARN": "arn:other-AbCdEf"},
])
def test_a_secret_answer_of_the_wrong_shape_or_name_is_invalid(change):
    with pytest.raises(extension.UpstreamInvalidResponse):
        extension.render_secret(dict(SECRET_ANSWER, **change), "app/s")


def test_an_invalid_answer_is_502_and_not_cached():
    ssm = StubClient({"Parameter": None})
    service, _, _, _ = make_service(ssm=ssm)
    for _ in range(2):
        status, _, body = answer(service, PARAMETER)
        assert (status, body["__type"]) == (502, "UpstreamInvalidResponse")
    assert len(ssm.calls) == 2


@pytest.mark.parametrize("data", [b"[" * 100000, b"{" * 100000, b"\xff\xfe garbage", b'{"__type": ["x"]}',
                                  b'{"__type": "bad type with spaces", "message": 5}', b"null"])
def test_any_error_body_gives_a_clean_error(data):
    error = extension.aws_error(400, data)
    assert (error.status, error.error_type, error.message) == (400, "UnknownError", "")


# ------------------------------------------------------------------ budgets on a fake clock


def make_client(clock, sleep=None, attempts=None):
    log = RecordingLog()
    config, _ = extension.load_config({"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k",
                                       "AWS_SECRET_ACCESS_KEY": "s"})
    credentials = extension.CredentialProvider(config, log)
    credentials.resolve()
    client = extension.ServiceClient("ssm", "http://127.0.0.1:9", "us-east-1", credentials, 1,
                                     extension.Stats(), log, clock, sleep or (lambda seconds: None))
    if attempts is not None:
        stand_in(client, "_attempt", attempts)
    return client


def test_an_attempt_that_is_not_the_last_gets_half_of_what_is_left():
    clock = FakeClock(100.0)
    client = make_client(clock)
    assert client.attempt_deadline(110.0, attempts_left=3) == 105.0
    assert client.attempt_deadline(110.0, attempts_left=1) == 110.0
    assert client.attempt_deadline(None, attempts_left=3) == 100.0 + extension.ATTEMPT_TIMEOUT_WITHOUT_BUDGET
    clock.now = 110.0
    with pytest.raises(extension.UpstreamTimeout):
        client.attempt_deadline(110.0, attempts_left=2)


def test_retries_stop_when_the_backoff_would_pass_the_deadline():
    clock = FakeClock(100.0)
    slept = []

    def attempts(target, body, credentials, deadline, attempts_left):
        clock.now = deadline  # the attempt failed just as the budget ran out
        raise extension.UpstreamUnreachable("down")

    def sleep(seconds):
        slept.append(seconds)
        clock.now += seconds

    client = make_client(clock, sleep, attempts)
    with pytest.raises(extension.UpstreamUnreachable):
        client.call("AmazonSSM.GetParameter", {}, 100.5, lambda answer: answer)
    assert slept == []  # no backoff fits in what is left: no sleep, no second attempt


def test_three_attempts_at_most_with_backoff_between():
    clock = FakeClock(100.0)
    slept, seen = [], []

    def attempts(target, body, credentials, deadline, attempts_left):
        seen.append(attempts_left)
        raise extension.UpstreamTimeout("slow")

    client = make_client(clock, slept.append, attempts)
    with pytest.raises(extension.UpstreamTimeout):
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    assert seen == [3, 2, 1]
    assert len(slept) == 2 and all(0 <= s <= extension.BACKOFF_CAP for s in slept)


@pytest.mark.parametrize("error", [extension.ConnectionsBusy("busy"), extension.CredentialsUnavailable("no"),
                                   extension.AwsError(400, "ParameterNotFound", "")])
def test_errors_that_are_not_retried(error):
    seen = []

    def attempts(*args):
        seen.append(1)
        raise error

    client = make_client(FakeClock(), attempts=attempts)
    with pytest.raises(type(error)):
        client.call("AmazonSSM.GetParameter", {}, None, lambda answer: answer)
    assert seen == [1]


def test_a_call_whose_budget_is_already_spent_is_a_timeout_not_busy_connections():
    clock = FakeClock(100.0)
    client = make_client(clock)
    with pytest.raises(extension.UpstreamTimeout):
        client.call("AmazonSSM.GetParameter", {}, 100.0, lambda answer: answer)


def test_no_free_connection_within_the_deadline_is_503_and_not_retried():
    class Busy:
        """Every connection taken: each wait runs out."""

        def __init__(self):
            self.waits = []

        def acquire(self, timeout=None):
            self.waits.append(timeout)
            return False

        def release(self):
            raise AssertionError("released a connection it never had")

    clock = FakeClock(100.0)
    client = make_client(clock)
    busy = stand_in(client, "_connections", Busy())
    with pytest.raises(extension.ConnectionsBusy) as caught:
        client.call("AmazonSSM.GetParameter", {}, 100.5, lambda answer: answer)
    assert busy.waits == [0.5]  # the whole budget, once: no retry
    assert (caught.value.status, caught.value.error_type) == (503, "ConnectionsBusy")
    assert caught.value.transient and not caught.value.retryable  # a stale value may answer


def test_an_invalid_answer_is_retried():
    answers = iter([{"Parameter": None}, PARAMETER_ANSWER])
    client = make_client(FakeClock(), attempts=lambda *args: next(answers))
    body = client.call("AmazonSSM.GetParameter", {}, None, lambda a: extension.render_parameter(a, "/app/p", None))
    assert json.loads(body)["Parameter"]["Value"] == "the-value"


# ------------------------------------------------------------------ snapshot restore


def test_a_wall_clock_jump_drops_the_cache():
    service, clock, wall, log = make_service()
    answer(service, PARAMETER)
    clock.now += 5
    wall.now += 5 + extension.RESTORE_JUMP_SECONDS  # within the jump allowance: nothing happens
    assert answer(service, PARAMETER)[1]["X-Parameters-Secrets-Cache"] == "hit"
    wall.now += 1  # now 11 s more than the monotonic clock moved
    assert answer(service, PARAMETER)[1]["X-Parameters-Secrets-Cache"] == "miss"
    assert ("info", "snapshot restore detected: cache and credentials dropped") in log.lines
    assert answer(service, PARAMETER)[1]["X-Parameters-Secrets-Cache"] == "hit"  # once only
    assert [line for line in log.lines if "restore" in line[1]] == [
        ("info", "snapshot restore detected: cache and credentials dropped")]


def test_a_freeze_moves_both_clocks_and_drops_nothing():
    service, clock, wall, log = make_service()
    answer(service, PARAMETER)
    clock.now += 200
    wall.now += 200  # a Lambda freeze: the monotonic clock ran on
    assert answer(service, PARAMETER)[1]["X-Parameters-Secrets-Cache"] == "hit"
    assert not [line for line in log.lines if "restore" in line[1]]


def test_container_credentials_are_dropped_and_judged_on_the_wall_clock():
    config, _ = extension.load_config({"AWS_REGION": "us-east-1",
                                       "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:9/creds"})
    wall = FakeClock(1_800_000_000.0)
    provider = extension.CredentialProvider(config, RecordingLog(), wall=wall, clock=FakeClock())
    provider.resolve()
    fetched = []

    def from_container(deadline):
        fetched.append(deadline)
        return extension.Credentials("ASIA", "secret", "token", wall.now + 3600)

    stand_in(provider, "_from_container", from_container)
    provider.get()
    provider.get()
    assert len(fetched) == 1
    wall.now += 3600 - extension.REFRESH_WINDOW_SECONDS + 1  # near expiry by the wall clock
    provider.get()
    assert len(fetched) == 2
    provider.forget()
    provider.get()
    assert len(fetched) == 3


def test_a_relative_container_uri_must_start_with_a_slash():
    config, _ = extension.load_config({"AWS_REGION": "us-east-1",
                                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "@127.0.0.1:9/x"})
    with pytest.raises(extension.CredentialsError, match="AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must start"):
        extension.CredentialProvider(config, RecordingLog()).resolve()


@pytest.mark.parametrize("url", ["ftp://user:pa55word@host", "https://user:pa55word@ssm.example.com"])
def test_an_endpoint_url_with_a_password_is_refused_without_printing_it(url):
    config, _ = extension.load_config({"AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url})
    assert config.endpoint_error is not None
    assert "pa55word" not in config.endpoint_error and "user:" not in config.endpoint_error
    assert "***@" in config.endpoint_error
