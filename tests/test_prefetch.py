"""PARAMETERS_SECRETS_EXTENSION_PREFETCH: values fetched right after the extension
starts listening, so that the first request finds them cached.

README.md: whitespace- or comma-separated entries ``ssm:<name>[?query]`` or
``secret:<id>[?query]``, query keys as in the HTTP API; a bad entry or a failed fetch is
a WARN and never fails init. The AWS calls are counted by a CountingProxy in front of
moto: the prefetch calls happen without any request to the extension, and the later
requests with the same selectors are cache hits that make no call at all.
"""

from conftest import SM_GET, SSM_GET, wait_for, warn_lines

PARAM = "/systemsmanager/parameters/get"
SECRET = "/secretsmanager/get"


def get_hit(ext, proxy, path):
    """GET path until the answer is a cache hit; return (headers, body).

    A request that arrives while the prefetch of the same key is still in flight
    shares that AWS call (and may say "miss"); it must never make a call of its own, so
    the proxy (reset after the prefetch calls) must stay at 0 throughout.
    """
    seen = []

    def hit():
        status, headers, body = ext.get_json(path)
        assert status == 200, (path, body)
        assert proxy.count() == 0, f"request {path} made an AWS call: not prefetched"
        seen.append((headers, body))
        return headers.get("X-Parameters-Secrets-Cache") == "hit"

    wait_for(hit, timeout=10, message="a cache hit for " + path)
    return seen[-1]


def _seed(ssm, secretsmanager):
    ssm.put_parameter(Name="/app/plain", Value="plain-1", Type="String")
    ssm.put_parameter(Name="/app/plain", Value="plain-2", Type="String", Overwrite=True)
    ssm.put_parameter(Name="/app/secure", Value="secure-plaintext-9", Type="SecureString")
    ssm.label_parameter_version(Name="/app/plain", ParameterVersion=1, Labels=["Old"])
    arn = secretsmanager.create_secret(Name="app/db", SecretString="db-v1")["ARN"]
    secretsmanager.put_secret_value(SecretId="app/db", SecretString="db-v2")
    other = secretsmanager.create_secret(Name="app/other", SecretString="other-v1")["ARN"]
    return arn, other


def test_prefetch_fills_the_cache_before_the_first_request(
        moto, ssm, secretsmanager, counting_proxy, start_extension):
    db_arn, other_arn = _seed(ssm, secretsmanager)
    proxy = counting_proxy(moto)
    entries = [
        "ssm:/app/plain",
        "ssm:/app/secure?withDecryption=true",
        "ssm:/app/plain?version=1",
        "ssm:/app/plain?label=Old",
        "secret:app/db",
        "secret:app/db?versionStage=AWSPREVIOUS",
        "secret:" + other_arn,  # an ARN holds ':' itself
    ]
    # Mixed separators: spaces, a comma, a newline and a tab.
    value = "  {} {},{}\n{}\t{} , {} {} ".format(*tuple(entries))
    ext = start_extension(proxy.url, env={"PARAMETERS_SECRETS_EXTENSION_PREFETCH": value})

    # No request has been made (only GET /ping): the calls come from the prefetch.
    wait_for(lambda: proxy.count() >= len(entries), timeout=10,
             message=f"{len(entries)} prefetch calls")
    assert proxy.count(SSM_GET) == 4
    assert proxy.count(SM_GET) == 3
    ssm_bodies = sorted(proxy.bodies(SSM_GET), key=lambda b: (b["Name"], b.get("WithDecryption")))
    assert [(b["Name"], bool(b.get("WithDecryption"))) for b in ssm_bodies] == [
        ("/app/plain", False), ("/app/plain:1", False), ("/app/plain:Old", False),
        ("/app/secure", True)]
    sm_bodies = proxy.bodies(SM_GET)
    assert {(b["SecretId"], b.get("VersionStage")) for b in sm_bodies} == {
        ("app/db", None), ("app/db", "AWSPREVIOUS"), (other_arn, None)}
    proxy.reset()

    # Every prefetched value is now a hit, with no AWS call.
    expectations = [
        (PARAM + "?name=%2Fapp%2Fplain", lambda b: b["Parameter"]["Value"] == "plain-2"),
        (PARAM + "?name=%2Fapp%2Fsecure&withDecryption=true",
         lambda b: b["Parameter"]["Value"] == "secure-plaintext-9"),
        (PARAM + "?name=%2Fapp%2Fplain&version=1",
         lambda b: b["Parameter"]["Value"] == "plain-1" and b["Parameter"]["Selector"] == ":1"),
        (PARAM + "?name=%2Fapp%2Fplain&label=Old",
         lambda b: b["Parameter"]["Value"] == "plain-1" and b["Parameter"]["Selector"] == ":Old"),
        (SECRET + "?secretId=app%2Fdb", lambda b: b["SecretString"] == "db-v2"),
        (SECRET + "?secretId=app%2Fdb&versionStage=AWSPREVIOUS",
         lambda b: b["SecretString"] == "db-v1"),
        (SECRET + "?secretId=" + other_arn, lambda b: b["SecretString"] == "other-v1"),
    ]
    for path, check in expectations:
        headers, body = get_hit(ext, proxy, path)
        assert check(body), (path, body)
    assert proxy.count() == 0

    # The decrypted prefetch does not answer a request without decryption.
    status, headers, body = ext.get_json(PARAM + "?name=%2Fapp%2Fsecure")
    assert status == 200, body
    assert headers.get("X-Parameters-Secrets-Cache") == "miss"
    assert body["Parameter"]["Value"] != "secure-plaintext-9"
    assert proxy.count(SSM_GET) == 1

    # Nothing secret in the logs (prefetch logs the keys at most).
    logs = ext.logs()
    for value in ("secure-plaintext-9", "db-v1", "db-v2", "other-v1"):
        assert value not in logs, value


def test_prefetch_with_secrets_manager_reference(moto, ssm, secretsmanager, counting_proxy,
                                                 start_extension):
    """A Secrets Manager reference through SSM (needs withDecryption=true, as in AWS)."""
    secretsmanager.create_secret(Name="ref/s", SecretString="ref-secret-value")
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH":
            "ssm:/aws/reference/secretsmanager/ref/s?withDecryption=true"})
    wait_for(lambda: proxy.count() >= 1, message="the prefetch call")
    proxy.reset()
    _, body = get_hit(
        ext, proxy,
        PARAM + "?name=%2Faws%2Freference%2Fsecretsmanager%2Fref%2Fs&withDecryption=true")
    assert body["Parameter"]["Value"] == "ref-secret-value"


def test_failed_prefetch_warns_and_the_extension_serves(
        moto, ssm, secretsmanager, counting_proxy, start_extension):
    ssm.put_parameter(Name="good", Value="good-value", Type="String")
    proxy = counting_proxy(moto)
    bad = [
        "ssm:/does/not/exist",            # ParameterNotFound
        "secret:no/such/secret",          # ResourceNotFoundException
        "bogus:thing",                    # unknown kind
        "ssm:",                           # empty name
        "secret:x?badKey=1",              # unknown query key
        "ssm:good?withDecryption=maybe",  # bad value
        "justaname",                      # no kind at all
    ]
    ext = start_extension(proxy.url, env={
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH": " ".join(bad + ["ssm:good"])})
    assert ext.alive()
    # The good entry is prefetched despite the bad ones around it.
    wait_for(lambda: proxy.count(SSM_GET) >= 2 and proxy.count(SM_GET) >= 1,
             message="the prefetch calls")

    def all_warned():
        warns = warn_lines(ext.stderr())
        return all(any(entry in line for line in warns)
                   for entry in ("/does/not/exist", "no/such/secret", "bogus:thing",
                                 "badKey", "maybe", "justaname"))

    wait_for(all_warned, message="one WARN naming each failed entry:\n" + ext.stderr())
    assert not [line for line in ext.stderr().splitlines() if " ERROR " in line], ext.stderr()
    assert ext.alive()

    proxy.reset()
    _, body = get_hit(ext, proxy, PARAM + "?name=good")
    assert body["Parameter"]["Value"] == "good-value"
    proxy.reset()

    # A failed prefetch caches nothing: the parameter created afterwards is found.
    ssm.put_parameter(Name="/does/not/exist", Value="now-it-does", Type="String")
    status, headers, body = ext.get_json(PARAM + "?name=%2Fdoes%2Fnot%2Fexist")
    assert status == 200, body
    assert headers.get("X-Parameters-Secrets-Cache") == "miss"
    assert body["Parameter"]["Value"] == "now-it-does"


def test_prefetch_with_aws_unreachable_does_not_fail_init(start_extension):
    """AWS down at start (connection refused): WARN, still listening, still refusing
    bad tokens and serving /ping; requests then get a clear 502."""
    ext = start_extension("http://127.0.0.1:9", env={
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH": "ssm:p secret:s",
        "SSM_PARAMETER_STORE_TIMEOUT_MILLIS": "1000",
        "SECRETS_MANAGER_TIMEOUT_MILLIS": "1000",
    })
    wait_for(lambda: len(warn_lines(ext.stderr())) >= 2, timeout=20,
             message="two prefetch WARN lines:\n" + ext.stderr())
    assert ext.alive()
    status, _, body = ext.get_json(PARAM + "?name=p")
    assert status == 502, body
    assert body["__type"] == "UpstreamUnreachable"
