"""Black-box tests of the HTTP API: every route, name form, selector, decryption case,
secret kind, the exact success body shape and every error row.

The real extension runs as a subprocess; AWS is a moto server reached through a
counting proxy (tests/conftest.py) so that a test can also check what was (or was not)
sent upstream.

Facts checked here, and where they are written down:
- docs/http-api.md: routes, query keys, the official body shape (PascalCase, every field
  present, null when absent, ISO-8601 UTC with milliseconds, base64 binary,
  "ResultMetadata": {}), Selector ":1" / ":Dev", first of version/label wins, the
  error table (AWS status and JSON passed through; 401/403; 400 naming the key; 404;
  405 with Allow: GET, and to HEAD without a body; 502; 504), errors never cached, the
  documented urllib client; an absolute-form target served as its path, and a Date on
  every answer (RFC 9112 section 3.2.2, RFC 9110 section 6.6.1).
- README.md: our error __types (MissingToken, InvalidToken, MissingQueryKey,
  InvalidQueryValue, UnknownQueryKey, RepeatedQueryKey, MalformedQuery,
  ForwardedRequestRefused, NotFound, MethodNotAllowed, UpstreamUnreachable,
  UpstreamTimeout); AWS errors normalised to {"__type", "message"}; the token is
  checked before the query is parsed or anything is fetched.
- docs/pitfalls.md (observed moto behaviour): moto answers GetParameter "name:1" with
  "Selector": null; an undecrypted SecureString reads "kms:alias/aws/ssm:<plaintext>";
  ResourceNotFoundException is 404 in moto; /aws/reference/secretsmanager/<id> needs
  WithDecryption=true (else 400 ValidationException, with the key "Message").
"""

import base64
import email.utils
import json
import re
import socket
import time
import urllib.parse
import urllib.request
from datetime import timezone
from types import SimpleNamespace

import pytest

from conftest import (
    SM_GET,
    SSM_GET,
    TOKEN_HEADER,
    CountingProxy,
    boto3_client,
    free_port,
    moto_reset,
    moto_set_auth,
)

PARAMS = "/systemsmanager/parameters/get"
SECRETS = "/secretsmanager/get"

ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PARAMETER_KEYS = {
    "ARN", "DataType", "LastModifiedDate", "Name", "Selector", "SourceResult",
    "Type", "Value", "Version",
}
SECRET_KEYS = {
    "ARN", "CreatedDate", "Name", "SecretBinary", "SecretString", "VersionId",
    "VersionStages", "ResultMetadata",
}

SECURE_PLAINTEXT = "plain-secure-value-7f3a"
BINARY = b"\x00\x01\xfe\xffbinary-secret"


def q(**pairs):
    """Query string with every value fully percent-encoded (the documented form)."""
    return "?" + "&".join(
        f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in pairs.items()
    )


def iso_ms(dt):
    """A boto3 datetime as the official body renders it: UTC, milliseconds, Z."""
    dt = dt.astimezone(timezone.utc)
    ms = round(dt.microsecond / 1000)
    base = dt.replace(microsecond=0)
    if ms == 1000:  # rounding carried into the next second
        from datetime import timedelta

        base, ms = base + timedelta(seconds=1), 0
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"


# --------------------------------------------------------------------- fixtures


def seed(ssm, sm):
    """Plant the parameters and secrets the tests read; return the facts they need."""
    ssm.put_parameter(Name="MyParameter", Value="hello", Type="String")
    ssm.put_parameter(Name="/app/db-url", Value="postgres://one", Type="String")
    ssm.put_parameter(Name="/app/db-url", Value="postgres://two", Type="String",
                      Overwrite=True)
    ssm.label_parameter_version(Name="/app/db-url", ParameterVersion=1, Labels=["Dev"])
    ssm.put_parameter(Name="/app/secure", Value=SECURE_PLAINTEXT, Type="SecureString")
    ssm.put_parameter(Name="list", Value="a,b,c", Type="StringList")
    ssm.put_parameter(Name="/my/parameter", Value="documented", Type="String")

    first = sm.create_secret(Name="app/db", SecretString='{"password":"pw-one"}')
    second = sm.put_secret_value(SecretId="app/db", SecretString='{"password":"pw-two"}')
    binary = sm.create_secret(Name="bin-secret", SecretBinary=BINARY)
    odd = sm.create_secret(Name="odd+name@x", SecretString="odd-value")
    return SimpleNamespace(
        db_arn=first["ARN"],
        db_v1=first["VersionId"],
        db_v2=second["VersionId"],
        bin_arn=binary["ARN"],
        odd_arn=odd["ARN"],
    )


@pytest.fixture(scope="module")
def world(moto_server, start_extension_module):
    """Seeded once per module: moto (reset, auth off), a counting proxy in front of it,
    and one extension with the cache OFF shared by the read tests.

    Sharing one process keeps this module fast; with the cache off every request reaches
    the proxy, so each test can check exactly what was sent upstream. The cached path
    with the default configuration is covered by ``fresh`` below and by
    test_cache_counting.py. Tests must not change the seeded items (use new names).
    """
    moto_set_auth(moto_server, False)
    moto_reset(moto_server)
    ssm = boto3_client("ssm", moto_server)
    sm = boto3_client("secretsmanager", moto_server)
    facts = seed(ssm, sm)
    proxy = CountingProxy(moto_server)
    ext = start_extension_module(
        proxy.url, env={"PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED": "FALSE"}
    )
    yield SimpleNamespace(ext=ext, proxy=proxy, facts=facts, moto=moto_server, ssm=ssm, sm=sm)
    proxy.close()


@pytest.fixture
def api(world):
    """The shared extension, with the proxy's record cleared for this test."""
    assert world.ext.alive(), "the shared extension died:\n" + world.ext.logs()[-3000:]
    world.proxy.reset()
    return world


@pytest.fixture
def fresh(world, counting_proxy, start_extension):
    """A new extension with the DEFAULT configuration (cache on) behind a new proxy,
    against the same seeded moto."""
    proxy = counting_proxy(world.moto)
    ext = start_extension(proxy.url)
    return SimpleNamespace(ext=ext, proxy=proxy, facts=world.facts, moto=world.moto,
                           ssm=world.ssm, sm=world.sm)


def assert_parameter_shape(body):
    assert set(body) == {"Parameter", "ResultMetadata"}, body
    assert body["ResultMetadata"] == {}
    assert set(body["Parameter"]) == PARAMETER_KEYS, body
    assert ISO_MS_Z.match(body["Parameter"]["LastModifiedDate"]), body
    return body["Parameter"]


def assert_secret_shape(body):
    assert set(body) == SECRET_KEYS, body
    assert body["ResultMetadata"] == {}
    assert ISO_MS_Z.match(body["CreatedDate"]), body
    return body


def assert_error(status, headers, body, expected_status, expected_type):
    assert status == expected_status, (status, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    parsed = json.loads(body)
    assert parsed["__type"] == expected_type, parsed
    assert isinstance(parsed.get("message"), str) and parsed["message"], parsed
    return parsed


# -------------------------------------------------------------------- routes


@pytest.mark.parametrize("route", [PARAMS, PARAMS + "/"])
def test_parameter_route_with_and_without_trailing_slash(api, route):
    status, headers, body = api.ext.get_json(route + q(name="MyParameter"))
    assert status == 200, body
    assert headers["Content-Type"].split(";")[0].strip() == "application/json"
    p = assert_parameter_shape(body)
    assert p["Value"] == "hello"
    assert api.proxy.bodies(SSM_GET) == [{"Name": "MyParameter", "WithDecryption": False}]


@pytest.mark.parametrize("route", [SECRETS, SECRETS + "/"])
def test_secret_route_with_and_without_trailing_slash(api, route):
    # docs/http-api.md documents the trailing slash for the parameter route only; the
    # secrets route is as lenient (a caller should not get 404 for a slash).
    status, headers, body = api.ext.get_json(route + q(secretId="app/db"))
    assert status == 200, body
    assert headers["Content-Type"].split(";")[0].strip() == "application/json"
    assert assert_secret_shape(body)["SecretString"] == '{"password":"pw-two"}'
    assert api.proxy.bodies(SM_GET) == [{"SecretId": "app/db"}]


def test_ping_needs_no_token(api):
    status, _, body = api.ext.get_json("/ping", token=None)
    assert status == 200 and body == {"status": "ok"}


# --------------------------------------------------------------- parameters


def test_plain_parameter_exact_body(fresh):
    # Default configuration (cache on): the miss and the hit give the same exact body.
    expected = fresh.ssm.get_parameter(Name="MyParameter")["Parameter"]
    for _ in range(2):
        status, _, body = fresh.ext.get_json(PARAMS + "?name=MyParameter")
        assert status == 200, body
        assert body == {
            "Parameter": {
                "ARN": "arn:aws:ssm:us-east-1:123456789012:parameter/MyParameter",
                "DataType": "text",
                "LastModifiedDate": iso_ms(expected["LastModifiedDate"]),
                "Name": "MyParameter",
                "Selector": None,
                "SourceResult": None,
                "Type": "String",
                "Value": "hello",
                "Version": 1,
            },
            "ResultMetadata": {},
        }
    assert fresh.proxy.count(SSM_GET) == 1


def test_string_list_parameter(api):
    status, _, body = api.ext.get_json(PARAMS + q(name="list"))
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert (p["Type"], p["Value"]) == ("StringList", "a,b,c")


@pytest.mark.parametrize(
    "query",
    [
        "?name=%2Fapp%2Fdb-url",  # encoded, as documented
        "?name=/app/db-url",  # callers also send it unencoded
        "?name=arn:aws:ssm:us-east-1:123456789012:parameter/app/db-url",  # doc's ARN form
        "?name=arn%3Aaws%3Assm%3Aus-east-1%3A123456789012%3Aparameter%2Fapp%2Fdb-url",
    ],
    ids=["encoded", "unencoded", "arn", "arn-encoded"],
)
def test_hierarchical_and_arn_names(api, query):
    status, _, body = api.ext.get_json(PARAMS + query)
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert p["Name"] == "/app/db-url"
    assert p["Value"] == "postgres://two"
    assert p["Version"] == 2
    assert p["ARN"] == "arn:aws:ssm:us-east-1:123456789012:parameter/app/db-url"
    sent = api.proxy.bodies(SSM_GET)
    assert len(sent) == 1
    # The name is sent upstream exactly as the caller meant it (decoded once).
    expected_name = urllib.parse.unquote(query[len("?name="):])
    assert sent[0]["Name"] == expected_name


@pytest.mark.parametrize(
    "name,value",
    [
        ("/aws/service/global-infrastructure/regions/us-east-1", "us-east-1"),
        ("/aws/service/ami-amazon-linux-latest/amzn2-ami-hvm-x86_64-gp2", None),
    ],
)
def test_public_parameter(api, name, value):
    # moto ships these public parameters (checked: moto 5.2.5).
    status, _, body = api.ext.get_json(PARAMS + q(name=name))
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert p["Name"] == name
    expected = api.ssm.get_parameter(Name=name)["Parameter"]
    assert p["Value"] == (value or expected["Value"])
    assert p["Version"] == expected["Version"]
    assert p["LastModifiedDate"] == iso_ms(expected["LastModifiedDate"])


@pytest.mark.parametrize(
    "query,value,selector,upstream_name",
    [
        ("&version=1", "postgres://one", ":1", "/app/db-url:1"),
        ("&version=2", "postgres://two", ":2", "/app/db-url:2"),
        ("&label=Dev", "postgres://one", ":Dev", "/app/db-url:Dev"),
        # Both given: only the first one after "?" counts (AWS documentation).
        ("&version=2&label=Dev", "postgres://two", ":2", "/app/db-url:2"),
        ("&label=Dev&version=2", "postgres://one", ":Dev", "/app/db-url:Dev"),
    ],
    ids=["version1", "version2", "label", "version-first", "label-first"],
)
def test_version_and_label_selectors(api, query, value, selector, upstream_name):
    status, _, body = api.ext.get_json(PARAMS + "?name=%2Fapp%2Fdb-url" + query)
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert p["Value"] == value
    # moto answers "Selector": null; the official body carries the selector used.
    assert p["Selector"] == selector
    assert p["Name"] == "/app/db-url"
    assert [b["Name"] for b in api.proxy.bodies(SSM_GET)] == [upstream_name]


def test_selector_first_wins_also_when_version_is_after_name(api):
    status, _, body = api.ext.get_json(PARAMS + "?label=Dev&name=%2Fapp%2Fdb-url&version=2")
    assert status == 200, body
    assert body["Parameter"]["Selector"] == ":Dev"
    assert body["Parameter"]["Value"] == "postgres://one"


@pytest.mark.parametrize(
    "query,decrypted",
    [
        ("", False),
        ("&withDecryption=false", False),
        ("&withDecryption=False", False),
        ("&withDecryption=true", True),
        ("&withDecryption=TRUE", True),
        ("&withDecryption=True", True),
    ],
)
def test_secure_string_with_decryption(api, query, decrypted):
    status, _, body = api.ext.get_json(PARAMS + "?name=%2Fapp%2Fsecure" + query)
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert p["Type"] == "SecureString"
    if decrypted:
        assert p["Value"] == SECURE_PLAINTEXT
    else:
        # moto's stand-in for ciphertext (docs/pitfalls.md): never the bare plaintext.
        assert p["Value"] == "kms:alias/aws/ssm:" + SECURE_PLAINTEXT
    assert api.proxy.bodies(SSM_GET) == [{"Name": "/app/secure", "WithDecryption": decrypted}]


def test_secrets_manager_reference_through_parameter_route(api):
    status, _, body = api.ext.get_json(
        PARAMS + q(name="/aws/reference/secretsmanager/app/db", withDecryption="true")
    )
    assert status == 200, body
    p = assert_parameter_shape(body)
    assert p["Value"] == '{"password":"pw-two"}'
    assert p["Type"] == "SecureString"
    # For a reference AWS fills SourceResult (the secret's description, as a string).
    assert isinstance(p["SourceResult"], str) and p["SourceResult"]
    sent = api.proxy.bodies(SSM_GET)
    assert sent == [{"Name": "/aws/reference/secretsmanager/app/db", "WithDecryption": True}]


def test_secrets_manager_reference_label_is_the_stage(api):
    status, _, body = api.ext.get_json(
        PARAMS + q(name="/aws/reference/secretsmanager/app/db", label="AWSPREVIOUS",
                   withDecryption="true")
    )
    assert status == 200, body
    assert body["Parameter"]["Value"] == '{"password":"pw-one"}'
    assert body["Parameter"]["Selector"] == ":AWSPREVIOUS"


def test_secrets_manager_reference_needs_decryption(api):
    # AWS (and moto) refuse a reference read without WithDecryption: 400
    # ValidationException, passed through. moto spells the key "Message".
    status, headers, body = api.ext.get(
        PARAMS + q(name="/aws/reference/secretsmanager/app/db")
    )
    parsed = assert_error(status, headers, body, 400, "ValidationException")
    assert "WithDecryption" in parsed["message"]


# ------------------------------------------------------------------ secrets


def test_string_secret_exact_body(fresh):
    expected = fresh.sm.get_secret_value(SecretId="app/db")
    for _ in range(2):
        status, _, body = fresh.ext.get_json(SECRETS + q(secretId="app/db"))
        assert status == 200, body
        assert body == {
            "ARN": fresh.facts.db_arn,
            "CreatedDate": iso_ms(expected["CreatedDate"]),
            "Name": "app/db",
            "SecretBinary": None,
            "SecretString": '{"password":"pw-two"}',
            "VersionId": fresh.facts.db_v2,
            "VersionStages": ["AWSCURRENT"],
            "ResultMetadata": {},
        }
    assert fresh.proxy.count(SM_GET) == 1


def test_binary_secret(api):
    status, _, body = api.ext.get_json(SECRETS + q(secretId="bin-secret"))
    assert status == 200, body
    s = assert_secret_shape(body)
    assert s["SecretString"] is None
    assert isinstance(s["SecretBinary"], str)
    assert base64.b64decode(s["SecretBinary"], validate=True) == BINARY
    assert s["ARN"] == api.facts.bin_arn


def test_secret_by_version_id(api):
    status, _, body = api.ext.get_json(
        SECRETS + q(secretId="app/db", versionId=api.facts.db_v1)
    )
    assert status == 200, body
    s = assert_secret_shape(body)
    assert s["SecretString"] == '{"password":"pw-one"}'
    assert s["VersionId"] == api.facts.db_v1
    assert api.proxy.bodies(SM_GET) == [{"SecretId": "app/db", "VersionId": api.facts.db_v1}]


def test_secret_by_version_stage(api):
    status, _, body = api.ext.get_json(
        SECRETS + q(secretId="app/db", versionStage="AWSPREVIOUS")
    )
    assert status == 200, body
    s = assert_secret_shape(body)
    assert s["SecretString"] == '{"password":"pw-one"}'
    assert s["VersionStages"] == ["AWSPREVIOUS"]
    assert s["VersionId"] == api.facts.db_v1
    assert api.proxy.bodies(SM_GET) == [{"SecretId": "app/db", "VersionStage": "AWSPREVIOUS"}]


@pytest.mark.parametrize("encoded", [True, False])
def test_secret_by_arn(api, encoded):
    arn = api.facts.db_arn
    query = q(secretId=arn) if encoded else "?secretId=" + arn
    status, _, body = api.ext.get_json(SECRETS + query)
    assert status == 200, body
    s = assert_secret_shape(body)
    assert (s["ARN"], s["Name"]) == (arn, "app/db")
    assert api.proxy.bodies(SM_GET) == [{"SecretId": arn}]


def test_secret_id_with_unencoded_plus_is_taken_literally(api):
    # Our choice (docs/http-api.md, "Query strings"): "+" in a query value stays "+" rather than
    # becoming a space. Secret names may contain "+" but never a space, and SSM names
    # allow neither, so the literal reading serves every valid name, and clients that
    # form-encode (space as "+", "+" as "%2B") still work.
    status, _, body = api.ext.get_json(SECRETS + "?secretId=odd+name@x")
    assert status == 200, body
    assert body["SecretString"] == "odd-value"
    assert api.proxy.bodies(SM_GET) == [{"SecretId": "odd+name@x"}]


def test_non_ascii_and_large_values_round_trip(api):
    # A 60 KB secret (the limit is 64 KB) and a parameter, both with non-ASCII text:
    # the body is UTF-8 JSON and the values come back exactly.
    big = ("pässwörd ✓ 密码 " * 3000)[:60000]
    api.sm.create_secret(Name="big-unicode", SecretString=big)
    api.ssm.put_parameter(Name="/unicode/value", Value="grüße ✓ 世界", Type="String")
    status, headers, raw = api.ext.get(SECRETS + "?secretId=big-unicode")
    assert status == 200
    assert int(headers["Content-Length"]) == len(raw)
    assert json.loads(raw.decode("utf-8"))["SecretString"] == big
    status, _, body = api.ext.get_json(PARAMS + q(name="/unicode/value"))
    assert status == 200, body
    assert body["Parameter"]["Value"] == "grüße ✓ 世界"


def test_secret_id_with_plus_and_at_is_percent_decoded_exactly(api):
    # "%2B" must become "+", not a space: names may contain /_+=.@-
    status, _, body = api.ext.get_json(SECRETS + q(secretId="odd+name@x"))
    assert status == 200, body
    assert body["SecretString"] == "odd-value"
    assert api.proxy.bodies(SM_GET) == [{"SecretId": "odd+name@x"}]


# ------------------------------------------------------ AWS errors pass through


@pytest.mark.parametrize(
    "path,status,aws_type",
    [
        (PARAMS + "?name=does-not-exist", 400, "ParameterNotFound"),
        (PARAMS + "?name=%2Fapp%2Fdb-url&version=9", 400, "ParameterVersionNotFound"),
        (PARAMS + "?name=%2Fapp%2Fdb-url&label=NoSuchLabel", 400, "ParameterNotFound"),
        (SECRETS + "?secretId=does-not-exist", 404, "ResourceNotFoundException"),
        (SECRETS + "?secretId=app%2Fdb&versionId=00000000-0000-0000-0000-000000000000",
         404, "ResourceNotFoundException"),
        (SECRETS + "?secretId=app%2Fdb&versionStage=NOSUCHSTAGE", 404,
         "ResourceNotFoundException"),
    ],
)
def test_aws_errors_pass_through_with_aws_status(api, path, status, aws_type):
    got_status, headers, body = api.ext.get(path)
    parsed = assert_error(got_status, headers, body, status, aws_type)
    # Normalised to {"__type", "message"} (moto also sends a duplicate "Message").
    assert set(parsed) == {"__type", "message"}, parsed
    assert api.proxy.count() == 1


def test_access_denied_passes_through(world, start_extension):
    # With moto's IAM checks on, a user allowed ssm:GetParameter only: the parameter is
    # served (so the signature is right) and the secret read is refused by "AWS"; the
    # refusal keeps AWS's status (moto: 403) and type, normalised to JSON from moto's XML.
    iam = boto3_client("iam", world.moto)
    iam.create_user(UserName="api-reader")
    iam.put_user_policy(
        UserName="api-reader", PolicyName="ssm-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": "*"}]}),
    )
    key = iam.create_access_key(UserName="api-reader")["AccessKey"]
    # Long-term keys: no session token may be signed (docs/pitfalls.md), so the request
    # token comes from AWS_TOKEN.
    ext = start_extension(world.moto, env={
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_SESSION_TOKEN": None,
        "AWS_TOKEN": "request-token-for-access-denied",
    })
    moto_set_auth(world.moto, True)
    try:
        status, _, body = ext.get_json(PARAMS + "?name=MyParameter")
        assert status == 200, body
        assert body["Parameter"]["Value"] == "hello"
        status, headers, body = ext.get(SECRETS + "?secretId=app%2Fdb")
    finally:
        moto_set_auth(world.moto, False)
    parsed = assert_error(status, headers, body, 403, "AccessDenied")
    assert "secretsmanager:GetSecretValue" in parsed["message"]
    assert set(parsed) == {"__type", "message"}, parsed


@pytest.mark.parametrize(
    "path,target,status",
    [
        (PARAMS + "?name=not-yet", SSM_GET, 400),       # ParameterNotFound
        (SECRETS + "?secretId=not-yet", SM_GET, 404),   # ResourceNotFoundException (moto)
    ],
)
def test_aws_errors_are_never_cached(fresh, path, target, status):
    # Default configuration: the cache is on, yet an error is fetched again each time.
    for _ in range(3):
        got, _, body = fresh.ext.get(path)
        assert got == status, body
    assert fresh.proxy.count(target) == 3
    # Once the item exists, the very next read sees it (no cached error).
    if target == SSM_GET:
        fresh.ssm.put_parameter(Name="not-yet", Value="now", Type="String")
    else:
        fresh.sm.create_secret(Name="not-yet", SecretString="now")
    status, _, body = fresh.ext.get_json(path)
    assert status == 200, body
    assert fresh.proxy.count(target) == 4


# --------------------------------------------------------------------- token


@pytest.mark.parametrize("path", [PARAMS + "?name=MyParameter", SECRETS + "?secretId=app%2Fdb"])
def test_missing_token_is_401_and_nothing_is_fetched(api, path):
    status, headers, body = api.ext.get(path, token=None)
    parsed = assert_error(status, headers, body, 401, "MissingToken")
    assert TOKEN_HEADER.lower() in parsed["message"].lower()
    assert api.proxy.count() == 0


@pytest.mark.parametrize("how", ["other", "prefix", "longer", "case"])
def test_wrong_token_is_403_and_nothing_is_fetched(api, how):
    real = api.ext.token
    wrong = {
        "other": "not-the-token",
        "prefix": real[:-1],
        "longer": real + "x",
        "case": real.swapcase() if real.swapcase() != real else real + "A",
    }[how]
    for path in (PARAMS + "?name=MyParameter", SECRETS + "?secretId=app%2Fdb"):
        status, headers, body = api.ext.get(path, token=wrong)
        parsed = assert_error(status, headers, body, 403, "InvalidToken")
        assert TOKEN_HEADER.lower() in parsed["message"].lower()
        assert real not in body.decode()
    assert api.proxy.count() == 0


def test_empty_token_header_is_refused(api):
    # An empty header is a token that does not match, not a missing one.
    status, headers, body = api.ext.get(PARAMS + "?name=MyParameter", token="")
    assert_error(status, headers, body, 403, "InvalidToken")
    assert api.proxy.count() == 0


def test_token_is_checked_before_the_query(api):
    # A bad query without a token must say 401, not 400: nothing is parsed before auth.
    status, headers, body = api.ext.get(PARAMS + "?withdecryption=true", token=None)
    assert_error(status, headers, body, 401, "MissingToken")
    status, headers, body = api.ext.get(SECRETS, token="wrong")
    assert_error(status, headers, body, 403, "InvalidToken")
    assert api.proxy.count() == 0


# ------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "path,key",
    [
        (PARAMS, "name"),
        (PARAMS + "?withDecryption=true", "name"),
        (PARAMS + "/?version=1", "name"),
        (SECRETS, "secretId"),
        (SECRETS + "?versionStage=AWSCURRENT", "secretId"),
    ],
)
def test_missing_required_key_is_400(api, path, key):
    status, headers, body = api.ext.get(path)
    parsed = assert_error(status, headers, body, 400, "MissingQueryKey")
    assert key in parsed["message"]
    assert api.proxy.count() == 0


@pytest.mark.parametrize(
    "path,key",
    [
        (PARAMS + "?name=MyParameter&withDecryption=yes", "withDecryption"),
        (PARAMS + "?name=MyParameter&withDecryption=", "withDecryption"),
        (PARAMS + "?name=MyParameter&withDecryption=1", "withDecryption"),
        (PARAMS + "?name=MyParameter&version=abc", "version"),
        (PARAMS + "?name=MyParameter&version=-1", "version"),
        (PARAMS + "?name=", "name"),
        (PARAMS + "?name=" + "a" * 2049, "name"),
        (SECRETS + "?secretId=", "secretId"),
        (PARAMS + "?name=MyParameter&refreshNow=maybe", "refreshNow"),
    ],
)
def test_invalid_query_value_is_400_naming_the_key(api, path, key):
    status, headers, body = api.ext.get(path)
    parsed = assert_error(status, headers, body, 400, "InvalidQueryValue")
    assert key in parsed["message"]
    assert api.proxy.count() == 0


@pytest.mark.parametrize(
    "path,typo,intended",
    [
        # A typo must not silently return ciphertext: refused, naming the intended key.
        (PARAMS + "?name=%2Fapp%2Fsecure&withdecryption=true", "withdecryption",
         "withDecryption"),
        (PARAMS + "?name=%2Fapp%2Fsecure&WithDecryption=true", "WithDecryption",
         "withDecryption"),
        (SECRETS + "?secretid=app%2Fdb", "secretid", "secretId"),
        (SECRETS + "?secretId=app%2Fdb&versionstage=AWSPREVIOUS", "versionstage",
         "versionStage"),
        (PARAMS + "?Name=MyParameter", "Name", "name"),
    ],
)
def test_near_miss_key_is_400_naming_the_intended_key(api, path, typo, intended):
    status, headers, body = api.ext.get(path)
    parsed = assert_error(status, headers, body, 400, "UnknownQueryKey")
    assert typo in parsed["message"]
    assert intended in parsed["message"].replace(typo, "")
    assert api.proxy.count() == 0


@pytest.mark.parametrize(
    "path,key",
    [
        (PARAMS + "?name=MyParameter&foo=bar", "foo"),
        # A secrets key on the parameter route is unknown there (and vice versa).
        (PARAMS + "?name=MyParameter&versionStage=AWSCURRENT", "versionStage"),
        (SECRETS + "?secretId=app%2Fdb&withDecryption=true", "withDecryption"),
    ],
)
def test_unknown_key_is_400(api, path, key):
    status, headers, body = api.ext.get(path)
    parsed = assert_error(status, headers, body, 400, "UnknownQueryKey")
    assert key in parsed["message"]
    assert api.proxy.count() == 0


def test_repeated_key_is_400(api):
    status, headers, body = api.ext.get(PARAMS + "?name=MyParameter&name=list")
    parsed = assert_error(status, headers, body, 400, "RepeatedQueryKey")
    assert "name" in parsed["message"]
    assert api.proxy.count() == 0


@pytest.mark.parametrize(
    "query", ["?name=%ZZ", "?name=%C3%28", "?name=a%00b", "?name=a%7Fb", "?name=a%C2%9Bb", "?jsonKey=%C2%85&name=a"],
    ids=["bad-percent", "not-utf8", "nul", "del", "c1-csi", "c1-nel"],
)
def test_malformed_query_is_400(api, query):
    status, headers, body = api.ext.get(PARAMS + query)
    assert_error(status, headers, body, 400, "MalformedQuery")
    assert api.proxy.count() == 0


def test_forwarded_request_is_refused(api):
    status, headers, body = api.ext.get(
        PARAMS + "?name=MyParameter", headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert_error(status, headers, body, 400, "ForwardedRequestRefused")
    assert api.proxy.count() == 0


@pytest.mark.parametrize(
    "path",
    ["/", "/systemsmanager/parameters", "/systemsmanager/parameters/get/x",
     "/secretsmanager", "/secretsmanager/get/x", "/SECRETSMANAGER/GET", "/favicon.ico"],
)
def test_unknown_path_is_404(api, path):
    status, headers, body = api.ext.get(path + "?name=MyParameter&secretId=app%2Fdb")
    assert_error(status, headers, body, 404, "NotFound")
    assert api.proxy.count() == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", [PARAMS + "?name=MyParameter", SECRETS + "?secretId=app%2Fdb"])
def test_other_methods_are_405_with_allow_get(api, method, path):
    status, headers, body = api.ext.request(method, path, body=b"{}")
    assert_error(status, headers, body, 405, "MethodNotAllowed")
    allowed = [m.strip() for m in headers["Allow"].split(",")]
    assert "GET" in allowed and method not in allowed
    assert api.proxy.count() == 0


def test_head_is_405_without_a_body_or_a_length(api):
    # RFC 9110 section 9.3.2: no content in an answer to HEAD; section 8.6: no
    # Content-Length either, since a GET would be answered another one.
    status, headers, body = api.ext.request("HEAD", PARAMS + "?name=MyParameter")
    assert (status, body, headers.get("Allow"), headers.get("Content-Length")) == (405, b"", "GET", None)
    assert api.proxy.count() == 0


def test_an_absolute_form_target_is_served_as_its_path(api):
    # RFC 9112 section 3.2.2: a server accepts the absolute form (what a client configured
    # with this extension as its proxy sends).
    status, _, body = api.ext.get(f"http://localhost:{api.ext.port}{PARAMS}?name=MyParameter")
    assert status == 200, body
    assert json.loads(body)["Parameter"]["Value"] == "hello"


@pytest.mark.parametrize("path", ["/ping", PARAMS + "?name=MyParameter", PARAMS + "?name=nope-nope", "/nope"])
def test_every_answer_carries_the_date(api, path):
    # RFC 9110 section 6.6.1; an IMF-fixdate (section 5.6.7) in GMT.
    _, headers, _ = api.ext.get(path)
    date = headers.get("Date")
    assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                        r"\d{4} \d\d:\d\d:\d\d GMT", date), date
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5


def test_server_keeps_serving_after_bad_requests(api):
    for path, status, error_type in (
        (PARAMS, 400, "MissingQueryKey"),
        (PARAMS + "?name=%ZZ", 400, "MalformedQuery"),
        ("/nope", 404, "NotFound"),
        (PARAMS + "?withdecryption=1", 400, "UnknownQueryKey"),
    ):
        assert_error(*api.ext.get(path), status, error_type)
    assert api.ext.request("POST", PARAMS)[0] == 405
    status, _, body = api.ext.get_json(PARAMS + "?name=MyParameter")
    assert status == 200 and body["Parameter"]["Value"] == "hello"


# --------------------------------------------------------- upstream failures


@pytest.mark.parametrize("path", [PARAMS + "?name=MyParameter", SECRETS + "?secretId=x"])
def test_unreachable_upstream_is_502(start_extension, path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ext = start_extension(closed)
    status, headers, body = ext.get(path, timeout=30)
    assert_error(status, headers, body, 502, "UpstreamUnreachable")
    # The extension is still healthy afterwards.
    assert ext.get("/ping", token=None)[0] == 200


@pytest.fixture
def black_hole():
    """A port that accepts TCP connections (kernel backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize(
    "path,variable",
    [
        (PARAMS + "?name=MyParameter", "SSM_PARAMETER_STORE_TIMEOUT_MILLIS"),
        (SECRETS + "?secretId=x", "SECRETS_MANAGER_TIMEOUT_MILLIS"),
    ],
)
def test_upstream_timeout_is_504(start_extension, black_hole, path, variable):
    ext = start_extension(black_hole, env={variable: "300"})
    status, headers, body = ext.get(path, timeout=30)
    assert_error(status, headers, body, 504, "UpstreamTimeout")
    assert ext.get("/ping", token=None)[0] == 200


# ---------------------------------------------------- clients and connections


def test_documented_urllib_client_example_works(world, start_extension):
    # The handler AWS documents (docs/http-api.md), with the port made ours: urllib,
    # "localhost", the token header, an encoded hierarchical name.
    ext = start_extension(world.moto)
    aws_session_token = ext.token
    req = urllib.request.Request(
        f"http://localhost:{ext.port}/systemsmanager/parameters/get?name=%2Fmy%2Fparameter"
    )
    req.add_header("X-Aws-Parameters-Secrets-Token", aws_session_token)
    config = urllib.request.urlopen(req, timeout=10).read()
    result = json.loads(config)
    assert result["Parameter"]["Value"] == "documented"
    assert result["Parameter"]["Name"] == "/my/parameter"


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no ::1")
def test_ipv6_loopback_also_answers(api):
    # README.md: also listen on ::1 where the host has it, so a client
    # whose "localhost" resolves to ::1 first is not refused.
    import http.client

    conn = http.client.HTTPConnection("::1", api.ext.port, timeout=10)
    try:
        status, _, body = api.ext.request_on(conn, "GET", PARAMS + "?name=MyParameter")
    finally:
        conn.close()
    assert status == 200, body
    assert json.loads(body)["Parameter"]["Value"] == "hello"


def test_listens_on_loopback_only(api):
    # Never 0.0.0.0: a non-loopback address of this host must not reach the extension.
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound address
        address = probe.getsockname()[0]
        probe.close()
    except OSError:
        pytest.skip("no non-loopback IPv4 address")
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address")
    with pytest.raises(OSError):
        socket.create_connection((address, api.ext.port), timeout=2).close()


def test_keep_alive_two_requests_on_one_connection(api):
    conn = api.ext.connection()
    try:
        status, headers, body = api.ext.request_on(conn, "GET", PARAMS + "?name=MyParameter")
        assert status == 200, body
        first_sock = conn.sock
        assert first_sock is not None, "server closed a keep-alive connection"
        assert "close" not in headers.get("Connection", "").lower()
        status, _, body = api.ext.request_on(conn, "GET", SECRETS + "?secretId=app%2Fdb")
        assert status == 200, body
        assert conn.sock is first_sock, "second request needed a new connection"
        # An error answer keeps the connection open too.
        status, _, _ = api.ext.request_on(conn, "GET", PARAMS + "?name=nope-nope")
        assert status == 400
        status, _, body = api.ext.request_on(conn, "GET", PARAMS + "?name=list")
        assert status == 200 and json.loads(body)["Parameter"]["Value"] == "a,b,c"
        assert conn.sock is first_sock
    finally:
        conn.close()
