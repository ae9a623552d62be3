"""Where the extension's AWS credentials (and its request token) come from.

Sources, in README.md's order: environment keys, container credentials
(AWS_CONTAINER_CREDENTIALS_FULL_URI with AWS_CONTAINER_AUTHORIZATION_TOKEN or
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE; Lambda SnapStart and ECS), the shared credentials
file (AWS_SHARED_CREDENTIALS_FILE / ~/.aws/credentials, AWS_PROFILE).

Container credentials are served by a local fake of the container credentials endpoint
(the protocol of ECS / Lambda SnapStart, as the AWS SDKs implement it: a GET with the
token in ``Authorization``, answered with JSON
``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}``, Expiration as ISO-8601 UTC).
Which credentials signed each AWS call is read from the requests a CountingProxy in
front of moto saw: the access key id in ``Authorization: ... Credential=<id>/...`` and
the ``X-Amz-Security-Token`` header.
"""

import datetime
import http.server
import json
import re
import threading

import pytest

import extension
from conftest import SSM_GET, boto3_client, moto_set_auth

# Every variable that could point the extension at credentials: removed unless a test
# sets it, so that each test sees exactly one source.
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
}


# ------------------------------------------------------------------ helpers


def _iso(dt):
    # The endpoint's format (ECS docs / SnapStart): 2017-11-27T21:54:33Z
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


class FakeCredentialsEndpoint:
    """A container credentials endpoint on 127.0.0.1:<random>/creds.

    ``expected_token`` is what ``Authorization`` must equal (401 otherwise).
    ``responses`` is a list of credential dicts (or ``(status, raw body)`` tuples for a
    broken answer) served in order; the last one is served again for every later call.
    ``calls`` records each request's Authorization header.
    """

    def __init__(self, expected_token, responses):
        self.expected_token = expected_token
        self.responses = list(responses)
        self.calls = []  # Authorization header of every request, in order
        self.served = []  # the AccessKeyId served for every authorised request
        self._lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization")
                with endpoint._lock:
                    endpoint.calls.append(auth)
                    ok = self.path == "/creds" and auth == endpoint.expected_token
                    if ok:
                        index = min(len(endpoint.served), len(endpoint.responses) - 1)
                        creds = endpoint.responses[index]
                        endpoint.served.append(
                            creds["AccessKeyId"] if isinstance(creds, dict) else None)
                if ok and isinstance(creds, tuple):  # (status, raw body): a broken endpoint
                    status, body = creds
                elif ok:
                    status, body = 200, json.dumps(creds).encode()
                else:
                    status = 401 if self.path == "/creds" else 404
                    body = json.dumps({"message": "denied"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/creds"
        threading.Thread(target=self._server.serve_forever,
                         kwargs={"poll_interval": 0.05}, daemon=True).start()

    def count(self):
        with self._lock:
            return len(self.calls)

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def creds_endpoint():
    made = []

    def make(expected_token, responses):
        endpoint = FakeCredentialsEndpoint(expected_token, responses)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


def start_on_container_credentials(start_extension, aws_url, endpoint, token="tok", **env):
    """The extension with no keys in its environment and its credentials from endpoint,
    authorised with AWS_CONTAINER_AUTHORIZATION_TOKEN=token (None: unset), which is
    also the request token callers send unless env sets another."""
    return start_extension(aws_url, env=dict(
        NO_CREDENTIALS, AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.url,
        AWS_CONTAINER_AUTHORIZATION_TOKEN=token, **env))


def container_creds(key_id, expires_in=datetime.timedelta(hours=6)):
    return {
        "AccessKeyId": key_id,
        "SecretAccessKey": "secret-of-" + key_id,
        "Token": "session-token-of-" + key_id,
        "Expiration": _iso(_utcnow() + expires_in),
    }


def _header(request, name):
    values = [v for k, v in request["headers"] if k.lower() == name.lower()]
    assert len(values) <= 1, f"header {name} sent {len(values)} times"
    return values[0] if values else None


def signer(request):
    """(access key id, x-amz-security-token or None) of one request the proxy saw."""
    auth = _header(request, "Authorization") or ""
    match = re.search(r"Credential=([^/,\s]+)/", auth)
    assert match, f"no SigV4 Authorization header: {auth!r}"
    token = _header(request, "X-Amz-Security-Token")
    if token is not None:
        # The token must also be covered by the signature.
        signed = re.search(r"SignedHeaders=([^,\s]+)", auth).group(1).split(";")
        assert "x-amz-security-token" in signed, auth
    return match.group(1), token


def get_param(ext, name, token=None):
    path = "/systemsmanager/parameters/get?name=" + name
    if token is None:
        return ext.get_json(path)
    return ext.get_json(path, token=token)


def seed_params(ssm, count):
    for i in range(count):
        ssm.put_parameter(Name=f"p{i}", Value=f"value-{i}", Type="String")


def _error_lines(text):
    return [line for line in text.splitlines() if "ERROR" in line]


# ------------------------------------------------------------- container credentials


def test_container_credentials_full_uri_with_token(moto, ssm, counting_proxy,
                                                   creds_endpoint, start_extension):
    """No keys in the environment: credentials come from the container endpoint,
    called with Authorization = AWS_CONTAINER_AUTHORIZATION_TOKEN; the request token
    falls back to AWS_CONTAINER_AUTHORIZATION_TOKEN (no AWS_SESSION_TOKEN); the calls
    carry the container credentials' own session token."""
    seed_params(ssm, 1)
    creds = container_creds("ASIACONTAINER1")
    endpoint = creds_endpoint("container-auth-token-1", [creds])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint,
                                         token="container-auth-token-1")
    status, headers, body = get_param(ext, "p0", token="container-auth-token-1")
    assert status == 200, body
    assert body["Parameter"]["Value"] == "value-0"
    assert proxy.count(SSM_GET) == 1
    assert signer(proxy.requests[0]) == ("ASIACONTAINER1", creds["Token"])
    assert endpoint.calls and set(endpoint.calls) == {"container-auth-token-1"}

    # The container token is the request token: a wrong one is refused.
    status, _, body = get_param(ext, "p0", token="not-the-token")
    assert status == 403, body
    # Neither the authorization token nor the credentials leak into the logs.
    logs = ext.logs()
    assert "container-auth-token-1" not in logs
    assert creds["SecretAccessKey"] not in logs and creds["Token"] not in logs


def test_container_credentials_are_cached(moto, ssm, counting_proxy, creds_endpoint,
                                          start_extension):
    seed_params(ssm, 5)
    endpoint = creds_endpoint("tok", [container_creds("ASIACACHED")])
    proxy = counting_proxy(moto)
    # Empty credential variables, as the Lambda RIE sets them, count as absent.
    ext = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint.url,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": "tok",
    })
    assert ext.token == "tok"
    for i in range(5):
        status, _, body = get_param(ext, f"p{i}")
        assert status == 200, body
        # refreshNow forces an AWS call each time: still no new credentials.
        status, _, body = get_param(ext, f"p{i}&refreshNow=true")
        assert status == 200, body
    assert proxy.count(SSM_GET) == 10
    assert endpoint.count() == 1
    assert {signer(r)[0] for r in proxy.requests} == {"ASIACACHED"}


def test_container_credentials_refreshed_before_expiration(
        moto, ssm, counting_proxy, creds_endpoint, start_extension):
    """Credentials that expire within seconds are replaced before the next AWS call
    (every SDK refreshes ahead of Expiration: an AWS call must never be signed with
    credentials about to expire)."""
    seed_params(ssm, 3)
    soon = container_creds("ASIASOON", expires_in=datetime.timedelta(seconds=20))
    later = container_creds("ASIALATER")
    endpoint = creds_endpoint("tok", [soon, later])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint)
    for i in range(3):
        status, _, body = get_param(ext, f"p{i}")
        assert status == 200, body
    assert proxy.count(SSM_GET) == 3
    # First answer (about to expire), then the fresh one, then no more fetches.
    assert endpoint.served == ["ASIASOON", "ASIALATER"]
    # The calls after the refresh are signed with the new credentials and token.
    assert signer(proxy.requests[-1]) == ("ASIALATER", later["Token"])
    assert signer(proxy.requests[-2]) == ("ASIALATER", later["Token"])


def test_container_credentials_with_token_file(moto, ssm, counting_proxy, creds_endpoint,
                                               start_extension, tmp_path):
    """AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: the token is read from the file, and read
    again for each refresh (EKS Pod Identity rotates the file; the SDKs re-read it)."""
    seed_params(ssm, 2)
    token_file = tmp_path / "container-token"
    token_file.write_text("file-token-1")
    soon = container_creds("ASIAFILE1", expires_in=datetime.timedelta(seconds=20))
    later = container_creds("ASIAFILE2")
    endpoint = creds_endpoint("file-token-1", [soon, later])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(
        start_extension, proxy.url, endpoint, token=None,
        AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token_file),
        # No AWS_SESSION_TOKEN / AWS_CONTAINER_AUTHORIZATION_TOKEN: the request token.
        AWS_TOKEN="request-token-for-file-test")
    status, _, body = get_param(ext, "p0", token="request-token-for-file-test")
    assert status == 200, body
    assert endpoint.calls[0] == "file-token-1"
    assert signer(proxy.requests[0])[0] == "ASIAFILE1"

    # The token rotates; the credentials are about to expire: the refresh must use
    # the file's new content.
    token_file.write_text("file-token-2")
    endpoint.expected_token = "file-token-2"
    status, _, body = get_param(ext, "p1", token="request-token-for-file-test")
    assert status == 200, body
    assert endpoint.calls[-1] == "file-token-2"
    assert endpoint.served == ["ASIAFILE1", "ASIAFILE2"]
    assert signer(proxy.requests[-1]) == ("ASIAFILE2", later["Token"])
    assert "file-token-1" not in ext.logs() and "file-token-2" not in ext.logs()


@pytest.mark.parametrize("variable", ["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN"])
def test_a_token_that_would_inject_a_header_is_never_sent(moto, ssm, counting_proxy, creds_endpoint,
                                                          start_extension, tmp_path, variable):
    """A token holding CR LF would add a header of its own to the request to the endpoint
    (once answered 200 when the injected header was what the endpoint wanted). Refused
    before a byte is sent: 502 CredentialsUnavailable, the variable named in the log, the
    token never shown."""
    token = "tok\r\nX-Injected: yes"
    token_file = tmp_path / "container-token"
    token_file.write_text(token + "\n")
    endpoint = creds_endpoint("tok", [container_creds("ASIANEVER")])
    proxy = counting_proxy(moto)
    in_file = variable.endswith("_FILE")
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint, token=None if in_file else token,
                                         AWS_TOKEN="request-token-for-injection-test",
                                         PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL="debug",
                                         **({variable: str(token_file)} if in_file else {}))
    status, _, body = ext.get("/systemsmanager/parameters/get?name=p0", token="request-token-for-injection-test")
    assert status == 502, body
    assert json.loads(body)["__type"] == "CredentialsUnavailable", body
    assert endpoint.count() == 0 and proxy.count() == 0
    assert f"{variable}: the token holds a character that is not printable ASCII" in ext.logs()
    assert "Injected" not in ext.logs() and b"Injected" not in body


def test_environment_credentials_win_over_container(moto, ssm, counting_proxy,
                                                    creds_endpoint, start_extension):
    seed_params(ssm, 1)
    endpoint = creds_endpoint("tok", [container_creds("ASIACONTAINERX")])
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": "ASIAENVKEY",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-session-token",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint.url,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": "tok",
    })
    # The request token is AWS_SESSION_TOKEN (it comes before the container token).
    assert ext.token == "env-session-token"
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    status, _, body = get_param(ext, "p0&refreshNow=true", token="tok")
    assert status == 403, body
    assert signer(proxy.requests[0]) == ("ASIAENVKEY", "env-session-token")
    assert endpoint.count() == 0


def test_aws_token_beats_session_token(moto, ssm, counting_proxy, start_extension):
    """AWS_TOKEN is the request token even when AWS_SESSION_TOKEN is set; the session
    token still signs (it belongs to the temporary keys), and is not accepted as the
    request token."""
    seed_params(ssm, 1)
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": "ASIATEMPORARY", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_SESSION_TOKEN": "the-session-token", "AWS_TOKEN": "the-request-token"})
    status, _, body = get_param(ext, "p0", token="the-request-token")
    assert status == 200, body
    status, _, body = get_param(ext, "p0", token="the-session-token")
    assert status == 403, body
    assert signer(proxy.requests[0]) == ("ASIATEMPORARY", "the-session-token")


def test_concurrent_requests_fetch_credentials_once(moto, ssm, counting_proxy,
                                                    creds_endpoint, start_extension):
    """Eight requests for eight names at once, before any credentials were fetched:
    one call to the credentials endpoint, not one per request."""
    import concurrent.futures

    seed_params(ssm, 8)
    endpoint = creds_endpoint("tok", [container_creds("ASIACONCURRENT")])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint,
                                         PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS="8")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: get_param(ext, f"p{i}"), range(8)))
    assert [status for status, _, _ in results] == [200] * 8, results
    assert endpoint.count() == 1
    assert proxy.count(SSM_GET) == 8


def test_failed_refresh_keeps_valid_credentials(moto, ssm, counting_proxy, creds_endpoint,
                                                start_extension):
    """Credentials inside the refresh window but not yet expired, and the endpoint
    fails: the extension keeps using them (WARN) instead of failing the request."""
    seed_params(ssm, 2)
    soon = container_creds("ASIASTILLVALID", expires_in=datetime.timedelta(seconds=90))
    endpoint = creds_endpoint("tok", [soon, (500, b'{"message": "internal"}')])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint)
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    status, _, body = get_param(ext, "p1")
    assert status == 200, body
    assert endpoint.count() >= 2  # the refresh was attempted
    assert signer(proxy.requests[-1])[0] == "ASIASTILLVALID"
    assert any(" WARN " in line and "credentials" in line
               for line in ext.stderr().splitlines()), ext.stderr()


@pytest.mark.parametrize("answer", [
    (200, b"this is not JSON"),
    (200, b'{"AccessKeyId": "ASIAHALF", "Token": "t"}'),
    (500, b'{"message": "internal error"}'),
    # A token that would inject a header of its own into every signed call to AWS.
    (200, json.dumps({"AccessKeyId": "ASIAX", "SecretAccessKey": "s", "Token": "t\r\nX-Injected: yes"}).encode()),
], ids=["not-json", "no-secret-key", "http-500", "token-with-cr-lf"])
def test_broken_container_endpoint_gives_clear_error(moto, ssm, counting_proxy,
                                                     creds_endpoint, start_extension, answer):
    seed_params(ssm, 1)
    endpoint = creds_endpoint("tok", [answer])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint)
    status, _, body = ext.get("/systemsmanager/parameters/get?name=p0")
    assert status == 502, body
    assert json.loads(body)["__type"] == "CredentialsUnavailable", body
    assert proxy.count() == 0
    assert ext.alive()
    # Not cached: once the endpoint works, the same request succeeds.
    endpoint.responses = [container_creds("ASIAFIXED")]
    endpoint.served = []
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    assert signer(proxy.requests[-1])[0] == "ASIAFIXED"


def test_container_endpoint_refusing_gives_clear_error(moto, ssm, counting_proxy,
                                                       creds_endpoint, start_extension):
    """The endpoint answers 401 (wrong authorization token): requests get a JSON error,
    nothing reaches AWS, the token is not echoed and the extension keeps serving."""
    seed_params(ssm, 1)
    endpoint = creds_endpoint("the-right-token", [container_creds("ASIANEVER")])
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint,
                                         token="a-wrong-container-token")
    status, _, body = ext.get("/systemsmanager/parameters/get?name=p0")
    # Not the caller's fault (its token was right): a 502, like an unreachable AWS.
    assert status == 502, body
    assert json.loads(body)["__type"] == "CredentialsUnavailable", body
    assert b"a-wrong-container-token" not in body
    assert proxy.count() == 0
    assert endpoint.count() >= 1
    assert ext.alive()
    status, _, _ = ext.get("/ping", token=None)
    assert status == 200
    assert "a-wrong-container-token" not in ext.logs()


def _container_url(env):
    """The container credentials URL the extension would call for ``env`` (no network).

    CredentialProvider.container_url() only builds and checks the URL, so it is used
    directly.
    """
    base = {"AWS_REGION": "us-east-1", "AWS_TOKEN": "t"}
    config, _ = extension.load_config(dict(base, **env))
    return extension.CredentialProvider(config, None).container_url()


def test_relative_uri_builds_link_local_url():
    """AWS_CONTAINER_CREDENTIALS_RELATIVE_URI means http://169.254.170.2<relative>
    (ECS / SDK convention). That address is unreachable here: only the URL is checked."""
    env = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc-123"}
    assert _container_url(env) == "http://169.254.170.2/v2/credentials/abc-123"


def test_relative_uri_wins_over_full_uri():
    """Both set: the SDKs use the relative URI (botocore's ContainerProvider checks
    AWS_CONTAINER_CREDENTIALS_RELATIVE_URI first)."""
    env = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc-123",
           "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/creds"}
    assert _container_url(env) == "http://169.254.170.2/v2/credentials/abc-123"


def test_full_uri_to_a_foreign_http_host_is_refused(start_extension_raw):
    """The authorization token must not travel in clear text to an arbitrary host: the
    SDKs accept http only for loopback and the ECS/EKS credential addresses. The
    extension refuses at start (nothing is contacted: it never gets a request)."""
    ext = start_extension_raw("http://127.0.0.1:9", env=dict(
        NO_CREDENTIALS, AWS_CONTAINER_CREDENTIALS_FULL_URI="http://192.0.2.10/creds",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="tok"))
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1 and "AWS_CONTAINER_CREDENTIALS_FULL_URI" in errors[0], ext.stderr()


# ------------------------------------------------------------ shared credentials file

CREDENTIALS_FILE = """\
[default]
aws_access_key_id = AKIADEFAULTKEY
aws_secret_access_key = default-secret

[dev]
aws_access_key_id=AKIADEVKEY
aws_secret_access_key=dev-secret

[temp]
aws_access_key_id = ASIATEMPKEY
aws_secret_access_key = temp-secret
aws_session_token = temp-session-token
"""


def _file_env(path, **extra):
    env = dict(NO_CREDENTIALS, AWS_SHARED_CREDENTIALS_FILE=str(path),
               AWS_TOKEN="local-request-token")
    env.update(extra)
    return env


@pytest.mark.parametrize("profile,key,token", [
    (None, "AKIADEFAULTKEY", None),
    ("dev", "AKIADEVKEY", None),
    ("temp", "ASIATEMPKEY", "temp-session-token"),
])
def test_shared_credentials_file_profiles(moto, ssm, counting_proxy, start_extension,
                                          tmp_path, profile, key, token):
    """Static keys of [default] / AWS_PROFILE's section; x-amz-security-token only when
    that profile has an aws_session_token (never the request token)."""
    seed_params(ssm, 1)
    path = tmp_path / "credentials"
    path.write_text(CREDENTIALS_FILE)
    proxy = counting_proxy(moto)
    extra = {"AWS_PROFILE": profile} if profile else {}
    ext = start_extension(proxy.url, env=_file_env(path, **extra))
    assert ext.token == "local-request-token"
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    assert signer(proxy.requests[0]) == (key, token)
    for request in proxy.requests:
        assert b"local-request-token" not in b"".join(
            v.encode() for _, v in request["headers"])


def test_shared_credentials_default_location(moto, ssm, counting_proxy, start_extension,
                                             tmp_path):
    """Without AWS_SHARED_CREDENTIALS_FILE: ~/.aws/credentials."""
    seed_params(ssm, 1)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(CREDENTIALS_FILE)
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env=dict(NO_CREDENTIALS, HOME=str(home),
                                              AWS_PROFILE="dev",
                                              AWS_TOKEN="local-request-token"))
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    assert signer(proxy.requests[0]) == ("AKIADEVKEY", None)


def test_environment_keys_win_over_shared_file(moto, ssm, counting_proxy, start_extension,
                                               tmp_path):
    seed_params(ssm, 1)
    path = tmp_path / "credentials"
    path.write_text(CREDENTIALS_FILE)
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "AWS_SHARED_CREDENTIALS_FILE": str(path),
        "AWS_ACCESS_KEY_ID": "ASIAFROMENV",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
    })
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    assert signer(proxy.requests[0]) == ("ASIAFROMENV", "env-token")


@pytest.mark.parametrize("where,section,lines", [
    ("config", "profile dev", ["sso_start_url = https://example.awsapps.com/start",
                               "sso_region = us-east-1", "sso_account_id = 123456789012",
                               "sso_role_name = ReadOnly"]),
    ("config", "profile dev", ["sso_session = corp", "sso_account_id = 123456789012",
                               "sso_role_name = ReadOnly"]),
    ("config", "profile dev", ["role_arn = arn:aws:iam::123456789012:role/r",
                               "source_profile = default"]),
    ("config", "profile dev", ["credential_process = /bin/false"]),
    ("credentials", "dev", ["role_arn = arn:aws:iam::123456789012:role/r",
                            "source_profile = default"]),
    ("credentials", "dev", ["credential_process = /bin/false"]),
    ("config", "default", ["sso_start_url = https://example.awsapps.com/start",
                           "sso_region = us-east-1", "sso_account_id = 123456789012",
                           "sso_role_name = ReadOnly"]),
], ids=["sso-legacy", "sso-session", "role-config", "process-config",
        "role-credentials", "process-credentials", "sso-default"])
def test_profile_needing_sso_or_role_is_refused(start_extension_raw, tmp_path, where,
                                                section, lines):
    """A profile the extension cannot use by itself (SSO, role assumption, a credential
    process) is refused at start with one ERROR line telling how to export
    credentials; exit code 2 (NoCredentials), and no AWS call is attempted."""
    home = tmp_path / "home"
    aws = home / ".aws"
    aws.mkdir(parents=True)
    text = "[{}]\n{}\n".format(section, "\n".join(lines))
    if section == "dev":
        text = "[default]\nregion = us-east-1\n\n" + text
    (aws / where).write_text(text)
    env = dict(NO_CREDENTIALS, HOME=str(home), AWS_TOKEN="local-request-token")
    profile = "default" if section == "default" else "dev"
    if profile != "default":
        env["AWS_PROFILE"] = profile
    ext = start_extension_raw("http://127.0.0.1:9", env=env)
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1, ext.stderr()
    # README.md: the line tells how to export the profile's credentials with the AWS CLI.
    hint = f'eval "$(aws configure export-credentials --profile {profile} --format env)"'
    assert hint in errors[0], errors[0]


@pytest.mark.parametrize("variable", ["AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"])
def test_environment_credentials_that_would_inject_a_header_refuse_the_start(start_extension_raw, variable):
    # Refused at start, naming the cause (not a 500 at the first call), never shown.
    env = {"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_SESSION_TOKEN": "env-token",
           "AWS_TOKEN": "request-token-for-injection-test", variable: "abc\r\nX-Injected: yes"}
    ext = start_extension_raw("http://127.0.0.1:9", env=env)
    assert ext.proc.returncode == 2, ext.stderr()
    assert _error_lines(ext.stderr()) == [f"[parameters-secrets-extension] ERROR version {extension.__version__}: "
                                          "a key is empty, or a key or the token is not printable ASCII text"]
    assert "\r" not in ext.stderr()  # the key id may be logged (at debug: not a secret), escaped
    if variable == "AWS_SESSION_TOKEN":
        assert "Injected" not in ext.stderr()


def test_missing_profile_is_refused(start_extension_raw, tmp_path):
    path = tmp_path / "credentials"
    path.write_text(CREDENTIALS_FILE)
    ext = start_extension_raw("http://127.0.0.1:9",
                              env=_file_env(path, AWS_PROFILE="nosuchprofile"))
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1, ext.stderr()
    assert "nosuchprofile" in errors[0], errors[0]


# ------------------------------------------- authenticated calls with long-term keys


def _iam_user_keys(moto_url):
    """An IAM user allowed to read parameters and secrets; its AKIA... key pair."""
    iam = boto3_client("iam", moto_url)
    iam.create_user(UserName="local-dev")
    iam.put_user_policy(
        UserName="local-dev", PolicyName="read",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "secretsmanager:GetSecretValue"],
            "Resource": "*"}]}))
    key = iam.create_access_key(UserName="local-dev")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_aws_token_with_static_keys_authenticated(moto, ssm, secretsmanager,
                                                  counting_proxy, start_extension, tmp_path):
    """Outside Lambda: long-term keys (no session token) and AWS_TOKEN as the request
    token. With moto verifying signatures, the calls succeed: the request token is
    not sent as x-amz-security-token (AWS refuses that with long-term keys)."""
    seed_params(ssm, 1)
    secretsmanager.create_secret(Name="local/s", SecretString="local-secret-value")
    key_id, secret = _iam_user_keys(moto)
    assert key_id.startswith("AKIA")
    moto_set_auth(moto, True)
    proxy = counting_proxy(moto)

    ext = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SESSION_TOKEN": None, "AWS_TOKEN": "local-request-token"})
    assert ext.token == "local-request-token"
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    status, _, body = ext.get_json("/secretsmanager/get?secretId=local%2Fs")
    assert status == 200, body
    assert body["SecretString"] == "local-secret-value"
    assert all(signer(r) == (key_id, None) for r in proxy.requests)

    # Same keys from a shared credentials file.
    path = tmp_path / "credentials"
    path.write_text(f"[local]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    ext2 = start_extension(proxy.url, env=_file_env(path, AWS_PROFILE="local"))
    status, _, body = get_param(ext2, "p0")
    assert status == 200, body

    # Control: moto really verifies (a wrong secret key is refused by AWS).
    ext3 = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "wrong" + secret,
        "AWS_SESSION_TOKEN": None, "AWS_TOKEN": "local-request-token"})
    status, _, body = get_param(ext3, "p0")
    # moto's signature error (403), passed through and normalised to {"__type", "message"}.
    assert status == 403, body
    assert body["__type"] == "SignatureDoesNotMatch", body


def test_container_credentials_authenticated(moto, ssm, counting_proxy, creds_endpoint,
                                             start_extension):
    """End to end with moto verifying signatures: the container endpoint hands out
    temporary credentials of an assumed role (moto STS); the extension's calls, signed
    with them and their session token, are accepted."""
    seed_params(ssm, 1)
    iam = boto3_client("iam", moto)
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="fn-role", AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(RoleName="fn-role", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "ssm:GetParameter", "Resource": "*"}]}))
    assumed = boto3_client("sts", moto).assume_role(
        RoleArn=role["Role"]["Arn"], RoleSessionName="snapstart")["Credentials"]
    creds = {"AccessKeyId": assumed["AccessKeyId"],
             "SecretAccessKey": assumed["SecretAccessKey"],
             "Token": assumed["SessionToken"],
             "Expiration": _iso(_utcnow() + datetime.timedelta(hours=1))}
    endpoint = creds_endpoint("tok", [creds])
    moto_set_auth(moto, True)
    proxy = counting_proxy(moto)
    ext = start_on_container_credentials(start_extension, proxy.url, endpoint)
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    assert body["Parameter"]["Value"] == "value-0"
    assert signer(proxy.requests[0]) == (creds["AccessKeyId"], creds["Token"])


# ---------------------------------------------------------- missing credentials/region


def test_missing_credentials_names_what_was_looked_for(start_extension_raw):
    ext = start_extension_raw("http://127.0.0.1:9",
                              env=dict(NO_CREDENTIALS, AWS_TOKEN="request-token"))
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1, ext.stderr()
    line = errors[0]
    assert "AWS_ACCESS_KEY_ID" in line, line
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" in line, line
    assert "credentials" in line.replace("AWS_CONTAINER_CREDENTIALS", ""), line


def test_key_without_secret_is_missing_credentials(start_extension_raw):
    ext = start_extension_raw("http://127.0.0.1:9", env={"AWS_SECRET_ACCESS_KEY": ""})
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1 and "AWS_SECRET_ACCESS_KEY" in errors[0], ext.stderr()
    assert ext.env["AWS_SESSION_TOKEN"] not in ext.stderr()


def test_missing_region_names_what_was_looked_for(start_extension_raw):
    ext = start_extension_raw("http://127.0.0.1:9",
                              env={"AWS_REGION": None, "AWS_DEFAULT_REGION": ""})
    assert ext.proc.returncode == 2, ext.stderr()
    errors = _error_lines(ext.stderr())
    assert len(errors) == 1, ext.stderr()
    assert "AWS_REGION" in errors[0] and "AWS_DEFAULT_REGION" in errors[0], errors[0]


def test_default_region_fallback(moto, ssm, counting_proxy, start_extension):
    seed_params(ssm, 1)
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={"AWS_REGION": None,
                                          "AWS_DEFAULT_REGION": "us-east-1"})
    status, _, body = get_param(ext, "p0")
    assert status == 200, body
    auth = _header(proxy.requests[0], "Authorization")
    assert "/us-east-1/ssm/aws4_request" in auth


@pytest.mark.parametrize("text,expected", [
    ("2026-11-26T16:00:00Z", 1795708800.0),             # the container endpoint's form
    ("2026-11-26T16:00:00.250Z", 1795708800.25),
    ("2026-11-26T18:00:00+02:00", 1795708800.0),        # an offset east of UTC
    ("2026-11-26T11:30:00-0430", 1795708800.0),
    ("2026-11-26T16:00:00", 1795708800.0),              # no offset: UTC
])
def test_expiration_times_are_parsed_to_epoch_seconds(text, expected):
    assert extension.parse_iso8601(text) == expected


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-11-26", "2026-11-26 16:00:00Z"])
def test_malformed_expiration_is_refused(text):
    with pytest.raises(ValueError):
        extension.parse_iso8601(text)
