"""PARAMETERS_SECRETS_EXTENSION_PREFETCH: values fetched right after the extension
starts listening, so that the first request finds them cached.

docs/configuration.md ("Prefetch"): whitespace- or comma-separated entries
``ssm:<name>[?query]``, ``secret:<id>[?query]`` and ``ssm-path:<path>[?query]``, query keys
as in the HTTP API; a bad entry or a failed fetch is a WARN and never fails init. Entries
are fetched in as few calls as the APIs allow (issue: a burst of cold starts under the
account's quota): parameters grouped by decryption flag into GetParameters calls of up
to 10 names (one version of a parameter per call), secrets without a version into
BatchGetSecretValue calls of up to 20 ids, a path with GetParametersByPath; each value
lands in the cache entry ``/get`` reads. Where IAM denies the batch action (the official
extension asks for ``ssm:GetParameter`` alone), prefetch falls back to one call per item,
says so in one INFO line, and remembers it. The AWS calls are counted by a CountingProxy
in front of moto: the prefetch calls happen without any request to the extension, and
the later requests with the same selectors are cache hits that make no call at all.
"""

import json
import threading

import extension
from conftest import (
    SM_GET,
    SSM_GET,
    UNIT_TOKEN,
    boto3_client,
    moto_set_auth,
    stand_in,
    unit_service,
    wait_for,
    warn_lines,
)

SSM_MULTI = "AmazonSSM.GetParameters"
SSM_PATH = "AmazonSSM.GetParametersByPath"
SM_BATCH = "secretsmanager.BatchGetSecretValue"

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

    # No request has been made (only GET /ping): the calls come from the prefetch. One
    # GetParameters call per version of /app/plain (an answer does not say which version
    # it is for: docs/design.md), one for the decrypted name; one BatchGetSecretValue for
    # both current secrets; the AWSPREVIOUS stage alone (a batch reads AWSCURRENT only).
    wait_for(lambda: proxy.count() >= 6, timeout=10, message="6 prefetch calls")
    assert proxy.count(SSM_MULTI) == 4
    assert proxy.count(SM_BATCH) == 1
    assert proxy.count(SM_GET) == 1
    assert proxy.count() == 6
    ssm_bodies = sorted(proxy.bodies(SSM_MULTI), key=lambda b: (b["Names"], b["WithDecryption"]))
    assert [(b["Names"], b["WithDecryption"]) for b in ssm_bodies] == [
        (["/app/plain"], False), (["/app/plain:1"], False), (["/app/plain:Old"], False),
        (["/app/secure"], True)]
    assert sorted(proxy.bodies(SM_BATCH)[0]["SecretIdList"]) == sorted(["app/db", other_arn])
    assert proxy.bodies(SM_GET) == [{"SecretId": "app/db", "VersionStage": "AWSPREVIOUS"}]
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
    # The good entry is prefetched despite the bad ones around it: one GetParameters
    # call for both names (one not found), one BatchGetSecretValue.
    wait_for(lambda: proxy.count(SSM_MULTI) >= 1 and proxy.count(SM_BATCH) >= 1,
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


# ------------------------------------------------------------------------ batches


def test_prefetch_batches_names_by_ten_and_ids_by_twenty(
        moto, ssm, secretsmanager, counting_proxy, start_extension):
    for index in range(25):
        ssm.put_parameter(Name=f"/many/p{index:02d}", Value=f"plain-{index}", Type="String")
        secretsmanager.create_secret(Name=f"many/s{index:02d}", SecretString=f"secret-{index}")
    for index in range(3):
        ssm.put_parameter(Name=f"/many/k{index}", Value=f"key-{index}", Type="SecureString")
    entries = ([f"ssm:/many/p{index:02d}" for index in range(25)]
               + [f"ssm:/many/k{index}?withDecryption=true" for index in range(3)]
               + [f"secret:many/s{index:02d}" for index in range(25)])
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={"PARAMETERS_SECRETS_EXTENSION_PREFETCH": " ".join(entries)})
    # ceil(25 / 10) + 1 GetParameters calls, ceil(25 / 20) BatchGetSecretValue calls.
    wait_for(lambda: proxy.count() >= 6, timeout=10, message="6 prefetch calls")
    assert (proxy.count(SSM_MULTI), proxy.count(SM_BATCH), proxy.count()) == (4, 2, 6)
    assert sorted(len(body["Names"]) for body in proxy.bodies(SSM_MULTI)) == [3, 5, 10, 10]
    assert sorted(len(body["SecretIdList"]) for body in proxy.bodies(SM_BATCH)) == [5, 20]
    proxy.reset()
    for index in range(25):
        _, body = get_hit(ext, proxy, PARAM + f"?name=%2Fmany%2Fp{index:02d}")
        assert body["Parameter"]["Value"] == f"plain-{index}"
        _, body = get_hit(ext, proxy, SECRET + f"?secretId=many%2Fs{index:02d}")
        assert body["SecretString"] == f"secret-{index}"
    for index in range(3):
        _, body = get_hit(ext, proxy, PARAM + f"?name=%2Fmany%2Fk{index}&withDecryption=true")
        assert body["Parameter"]["Value"] == f"key-{index}"
    # The batch routes read the same entries.
    names = ",".join(f"/many/p{index:02d}" for index in range(10))
    status, headers, body = ext.get_json("/systemsmanager/parameters/get-multiple?names=" + names)
    assert (status, headers.get("X-Parameters-Secrets-Cache")) == (200, "hit"), body
    assert proxy.count() == 0


def test_prefetch_of_a_path_fills_each_parameter_and_the_path(
        moto, ssm, counting_proxy, start_extension):
    for index in range(12):
        ssm.put_parameter(Name=f"/tree/p{index:02d}", Value=f"leaf-{index}", Type="String")
    ssm.put_parameter(Name="/tree/deep/x", Value="deep-x", Type="String")
    ssm.put_parameter(Name="/tree/deep/y", Value="deep-y", Type="SecureString")
    ssm.put_parameter(Name="/elsewhere", Value="outside", Type="String")
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH": "ssm-path:/tree/?recursive=true&withDecryption=true"})
    # 14 parameters, pages of 10: two calls. A /get that comes before the tree is in
    # makes a call of its own (the names are not known before): wait for the DEBUG line.
    wait_for(lambda: "prefetched ssm-path" in ext.stderr(), timeout=10, message="the path's prefetch")
    assert (proxy.count(SSM_PATH), proxy.count()) == (2, 2)
    assert proxy.bodies(SSM_PATH)[0]["Recursive"] is True
    proxy.reset()
    for index in range(12):
        _, body = get_hit(ext, proxy, PARAM + f"?name=%2Ftree%2Fp{index:02d}&withDecryption=true")
        assert body["Parameter"]["Value"] == f"leaf-{index}"
    _, body = get_hit(ext, proxy, PARAM + "?name=%2Ftree%2Fdeep%2Fy&withDecryption=true")
    assert body["Parameter"]["Value"] == "deep-y"
    _, body = get_hit(ext, proxy, "/systemsmanager/parameters/get-by-path?path=%2Ftree%2F&recursive=true"
                                  "&withDecryption=true")
    assert sorted(parameter["Name"] for parameter in body["Parameters"]) == sorted(
        [f"/tree/p{index:02d}" for index in range(12)] + ["/tree/deep/x", "/tree/deep/y"])
    # Entries differ by decryption flag, as for /get: no decryption is another entry.
    status, headers, body = ext.get_json(PARAM + "?name=%2Ftree%2Fp00")
    assert (status, headers.get("X-Parameters-Secrets-Cache")) == (200, "miss")
    assert proxy.count(SSM_GET) == 1


def _reader_keys(moto):
    """Keys of an IAM user allowed only what the official extension asks for."""
    iam = boto3_client("iam", moto)
    iam.create_user(UserName="narrow")
    iam.put_user_policy(UserName="narrow", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["ssm:GetParameter", "secretsmanager:GetSecretValue"],
            "Resource": "*"}]}))
    key = iam.create_access_key(UserName="narrow")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_prefetch_with_only_get_parameter_allowed_falls_back_once_and_remembers(
        moto, ssm, secretsmanager, counting_proxy, start_extension):
    for index in range(3):
        ssm.put_parameter(Name=f"/narrow/p{index}", Value=f"narrow-{index}", Type="String")
        secretsmanager.create_secret(Name=f"narrow/s{index}", SecretString=f"narrow-secret-{index}")
    key_id, secret = _reader_keys(moto)
    moto_set_auth(moto, True)
    proxy = counting_proxy(moto)
    entries = [f"ssm:/narrow/p{index}" for index in range(3)] + [f"secret:narrow/s{index}" for index in range(3)]
    ext = start_extension(proxy.url, env={
        "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": None,
        "AWS_TOKEN": "narrow-request-token", "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info",
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH": " ".join(entries)})
    # One denied batch call per service, then one call per item.
    wait_for(lambda: proxy.count() >= 8, timeout=10, message="the prefetch calls")
    assert (proxy.count(SSM_MULTI), proxy.count(SM_BATCH), proxy.count(SSM_GET), proxy.count(SM_GET)) == (1, 1, 3, 3)

    def told():
        return [line for line in ext.stderr().splitlines() if " INFO " in line and "is denied" in line]

    wait_for(lambda: len(told()) == 2, message="one INFO line per service:\n" + ext.stderr())
    assert any("ssm:GetParameters" in line for line in told())
    assert any("secretsmanager:BatchGetSecretValue" in line for line in told())
    assert warn_lines(ext.stderr()) == []
    proxy.reset()
    for index in range(3):
        _, body = get_hit(ext, proxy, PARAM + f"?name=%2Fnarrow%2Fp{index}")
        assert body["Parameter"]["Value"] == f"narrow-{index}"
        _, body = get_hit(ext, proxy, SECRET + f"?secretId=narrow%2Fs{index}")
        assert body["SecretString"] == f"narrow-secret-{index}"
    # Remembered for the life of the process: a later batch route goes straight to
    # single calls, and nothing more is logged.
    status, _, body = ext.get_json("/systemsmanager/parameters/get-multiple?names=/narrow/x,/narrow/p0&refreshNow=true")
    assert status == 200, body
    assert body["InvalidParameters"] == ["/narrow/x"]
    assert (proxy.count(SSM_MULTI), proxy.count(SSM_GET)) == (0, 2)
    assert len(told()) == 2


# ------------------------------------------------------------ a /get during prefetch


def test_a_get_during_the_prefetch_batch_joins_its_call():
    """The function's INIT may ask before the prefetch is done: a /get of a name whose
    batch is claimed waits for that batch's call instead of making its own, even when it
    comes before the call has started (prefetch claims its keys before returning, and
    main() starts serving only then)."""
    calls = []

    class Client:
        clock = None

        def call(self, target, payload, deadline, render):
            calls.append(target)
            if target == "AmazonSSM.GetParameters":
                return render({"Parameters": [{"Name": name, "Value": "v" + name, "Type": "String", "Version": 1}
                                              for name in payload["Names"]], "InvalidParameters": []})
            raise AssertionError(f"unexpected call {target}")

        def close_idle(self):
            pass

    client = Client()
    service, clock, _, _ = unit_service(ssm=client)
    client.clock = clock
    # The prefetch's thread is held back: its calls have not started when the /get comes.
    held = []
    start_new_thread = extension._thread.start_new_thread
    stand_in(extension._thread, "start_new_thread", lambda function, args: held.append((function, args)))
    try:
        service.prefetch(["ssm:/a", "ssm:/b"])
    finally:
        extension._thread.start_new_thread = start_new_thread
    assert len(held) == 1 and calls == []
    answers = []
    getter = threading.Thread(target=lambda: answers.append(service.answer(
        "GET", "/systemsmanager/parameters/get?name=/b", [("x-aws-parameters-secrets-token", UNIT_TOKEN)])))
    getter.start()
    getter.join(0.2)
    assert getter.is_alive() and calls == []  # waiting for the claimed batch, not calling AWS
    threading.Thread(target=held[0][0], args=held[0][1]).start()
    getter.join(10)
    assert calls == ["AmazonSSM.GetParameters"]
    status, headers, body = answers[0]
    assert status == 200
    assert json.loads(body)["Parameter"]["Value"] == "v/b"
    assert dict(headers)["X-Parameters-Secrets-Cache"] == "miss"  # it shared the batch's call
