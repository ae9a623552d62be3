"""Black-box cache tests: count the requests that reach AWS.

The real extension talks to moto through a counting proxy (tests/conftest.py); each
test asserts how many GetParameter / GetSecretValue calls went upstream.

Facts checked here, and where they are written down:
- docs/configuration.md: SSM_PARAMETER_STORE_TTL / SECRETS_MANAGER_TTL (default 300 s;
  0 = bypass the cache for that service), PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED
  (TRUE/FALSE, any case; FALSE bypasses entirely), PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE
  (0-1000, default 1000; 0 = bypass).
- docs/design.md: the cache is keyed by everything that changes the answer (service,
  name or id, selector / version / stage, decryption flag), with least-recently-used
  eviction at the size cap; errors are never cached.
- README.md: header X-Parameters-Secrets-Cache: hit | miss | stale | bypass on every
  200 from the two routes; refreshNow=true|false|1|0 forces a fresh read.
"""

import json
import time

import pytest

from conftest import SM_GET, SSM_GET

PARAMS = "/systemsmanager/parameters/get"
SECRETS = "/secretsmanager/get"
CACHE_HEADER = "X-Parameters-Secrets-Cache"


@pytest.fixture
def world(moto, ssm, secretsmanager, counting_proxy, start_extension):
    """Seed moto; return a factory that starts an extension behind a counting proxy."""
    ssm.put_parameter(Name="/a", Value="value-a", Type="String")
    ssm.put_parameter(Name="/b", Value="value-b", Type="String")
    ssm.put_parameter(Name="/c", Value="value-c", Type="String")
    ssm.put_parameter(Name="/versioned", Value="v-one", Type="String")
    ssm.put_parameter(Name="/versioned", Value="v-two", Type="String", Overwrite=True)
    ssm.label_parameter_version(Name="/versioned", ParameterVersion=1, Labels=["Dev"])
    ssm.put_parameter(Name="/secure", Value="secure-plain", Type="SecureString")
    first = secretsmanager.create_secret(Name="db", SecretString="secret-one")
    secretsmanager.put_secret_value(SecretId="db", SecretString="secret-two")

    class World:
        def __init__(self):
            self.ssm = ssm
            self.sm = secretsmanager
            self.db_v1 = first["VersionId"]
            self.proxy = counting_proxy(moto)
            self.ext = None

        def start(self, **env):
            self.ext = start_extension(self.proxy.url, env=env)
            return self

        def get(self, path, expect_status=200):
            status, headers, body = self.ext.get(path)
            assert status == expect_status, (path, status, body)
            return json.loads(body), headers.get(CACHE_HEADER)

        def param(self, query):
            body, cache = self.get(PARAMS + "?" + query)
            return body["Parameter"]["Value"], cache

        def secret(self, query):
            body, cache = self.get(SECRETS + "?" + query)
            return body["SecretString"], cache

    return World()


def test_hit_within_ttl_is_one_aws_call(world):
    w = world.start()
    assert w.param("name=%2Fa") == ("value-a", "miss")
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.proxy.count(SSM_GET) == 1
    assert w.secret("secretId=db") == ("secret-two", "miss")
    assert w.secret("secretId=db") == ("secret-two", "hit")
    assert w.proxy.count(SM_GET) == 1


def test_cached_answer_is_the_same_body(world):
    w = world.start()
    first, _ = w.get(PARAMS + "?name=%2Fa")
    second, _ = w.get(PARAMS + "?name=%2Fa")
    assert first == second
    first, _ = w.get(SECRETS + "?secretId=db")
    second, _ = w.get(SECRETS + "?secretId=db")
    assert first == second


def test_cached_value_is_served_until_ttl_even_if_aws_changed(world):
    w = world.start()
    assert w.param("name=%2Fa")[0] == "value-a"
    w.ssm.put_parameter(Name="/a", Value="changed", Type="String", Overwrite=True)
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.proxy.count(SSM_GET) == 1


@pytest.mark.parametrize("service", ["ssm", "secrets"])
def test_ttl_expiry_triggers_a_new_call(world, service):
    if service == "ssm":
        w = world.start(SSM_PARAMETER_STORE_TTL="1")
        read, target = (lambda: w.param("name=%2Fa")), SSM_GET

        def change():
            w.ssm.put_parameter(Name="/a", Value="changed", Type="String", Overwrite=True)
        old = "value-a"
    else:
        w = world.start(SECRETS_MANAGER_TTL="1")
        read, target = (lambda: w.secret("secretId=db")), SM_GET

        def change():
            w.sm.put_secret_value(SecretId="db", SecretString="changed")
        old = "secret-two"
    assert read() == (old, "miss")
    change()
    # Poll (bounded) until the entry expires and the new value is fetched.
    deadline = time.monotonic() + 10
    while True:
        value, cache = read()
        if value == "changed":
            break
        assert value == old and cache == "hit"
        assert time.monotonic() < deadline, "entry never expired with TTL=1"
        time.sleep(0.1)
    assert cache == "miss"
    assert w.proxy.count(target) == 2
    # The refreshed value is cached again.
    assert read() == ("changed", "hit")


def test_secrets_ttl_zero_bypasses_only_secrets(world):
    w = world.start(SECRETS_MANAGER_TTL="0")
    for _ in range(3):
        assert w.secret("secretId=db") == ("secret-two", "bypass")
    assert w.proxy.count(SM_GET) == 3
    assert w.param("name=%2Fa") == ("value-a", "miss")
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.proxy.count(SSM_GET) == 1


def test_parameter_ttl_zero_bypasses_only_parameters(world):
    w = world.start(SSM_PARAMETER_STORE_TTL="0")
    for _ in range(3):
        assert w.param("name=%2Fa") == ("value-a", "bypass")
    assert w.proxy.count(SSM_GET) == 3
    assert w.secret("secretId=db") == ("secret-two", "miss")
    assert w.secret("secretId=db") == ("secret-two", "hit")
    assert w.proxy.count(SM_GET) == 1


@pytest.mark.parametrize(
    "env",
    [
        {"PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED": "FALSE"},
        {"PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED": "false"},
        {"PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE": "0"},
        {"SSM_PARAMETER_STORE_TTL": "0", "SECRETS_MANAGER_TTL": "0"},
    ],
    ids=["enabled-FALSE", "enabled-false", "size-0", "both-ttl-0"],
)
def test_cache_bypass_rules(world, env):
    w = world.start(**env)
    for _ in range(3):
        assert w.param("name=%2Fa") == ("value-a", "bypass")
        assert w.secret("secretId=db") == ("secret-two", "bypass")
    assert w.proxy.count(SSM_GET) == 3
    assert w.proxy.count(SM_GET) == 3
    # Bypassing means fresh values at once.
    w.ssm.put_parameter(Name="/a", Value="changed", Type="String", Overwrite=True)
    assert w.param("name=%2Fa")[0] == "changed"


def test_cache_enabled_true_any_case_caches(world):
    w = world.start(PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED="true")
    w.param("name=%2Fa")
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.proxy.count(SSM_GET) == 1


def test_lru_eviction_keeps_the_recently_used(world):
    w = world.start(PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE="2")
    assert w.param("name=%2Fa")[1] == "miss"
    assert w.param("name=%2Fb")[1] == "miss"
    assert w.param("name=%2Fa")[1] == "hit"  # a is now the most recently used
    assert w.param("name=%2Fc")[1] == "miss"  # evicts b, the least recently used
    assert w.proxy.count(SSM_GET) == 3
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.param("name=%2Fc") == ("value-c", "hit")
    assert w.proxy.count(SSM_GET) == 3
    assert w.param("name=%2Fb") == ("value-b", "miss")  # b was evicted
    assert w.proxy.count(SSM_GET) == 4


def test_size_cap_counts_parameters_and_secrets_together(world):
    w = world.start(PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE="2")
    w.param("name=%2Fa")
    w.secret("secretId=db")
    w.param("name=%2Fb")  # third item: a (oldest) goes
    assert w.secret("secretId=db")[1] == "hit"
    assert w.param("name=%2Fb")[1] == "hit"
    assert w.param("name=%2Fa")[1] == "miss"
    assert w.proxy.count() == 4


def test_size_one_holds_exactly_one_item(world):
    w = world.start(PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE="1")
    w.param("name=%2Fa")
    assert w.param("name=%2Fa")[1] == "hit"
    w.param("name=%2Fb")
    assert w.param("name=%2Fa")[1] == "miss"
    assert w.proxy.count(SSM_GET) == 3


@pytest.mark.parametrize("first", ["true", "false"])
def test_decrypted_and_encrypted_reads_never_share_an_entry(world, first):
    w = world.start()
    plain, cipher = "secure-plain", "kms:alias/aws/ssm:secure-plain"
    expected = {"true": plain, "false": cipher}
    second = "false" if first == "true" else "true"
    assert w.param(f"name=%2Fsecure&withDecryption={first}") == (expected[first], "miss")
    assert w.param(f"name=%2Fsecure&withDecryption={second}") == (expected[second], "miss")
    assert w.proxy.count(SSM_GET) == 2
    for flag in (first, second, first, second):
        assert w.param(f"name=%2Fsecure&withDecryption={flag}") == (expected[flag], "hit")
    # Without the key means no decryption: never the cached plaintext.
    assert w.param("name=%2Fsecure")[0] == cipher
    assert [b["WithDecryption"] for b in w.proxy.bodies(SSM_GET)][:2] == [
        first == "true", second == "true"
    ]


def test_version_label_and_latest_are_separate_entries(world):
    w = world.start()
    assert w.param("name=%2Fversioned") == ("v-two", "miss")
    assert w.param("name=%2Fversioned&version=1") == ("v-one", "miss")
    assert w.param("name=%2Fversioned&label=Dev") == ("v-one", "miss")
    assert w.param("name=%2Fversioned&version=2") == ("v-two", "miss")
    assert w.proxy.count(SSM_GET) == 4
    assert w.param("name=%2Fversioned") == ("v-two", "hit")
    assert w.param("name=%2Fversioned&version=1") == ("v-one", "hit")
    assert w.param("name=%2Fversioned&label=Dev") == ("v-one", "hit")
    assert w.param("name=%2Fversioned&version=2") == ("v-two", "hit")
    assert w.proxy.count(SSM_GET) == 4


def test_first_selector_wins_in_the_cache_key_too(world):
    w = world.start()
    assert w.param("name=%2Fversioned&version=2&label=Dev") == ("v-two", "miss")
    # Same name, label first this time: a different request, not the cached version=2.
    assert w.param("name=%2Fversioned&label=Dev&version=2")[0] == "v-one"


def test_secret_stage_and_version_are_separate_entries(world):
    w = world.start()
    assert w.secret("secretId=db") == ("secret-two", "miss")
    assert w.secret("secretId=db&versionStage=AWSPREVIOUS") == ("secret-one", "miss")
    assert w.secret(f"secretId=db&versionId={w.db_v1}") == ("secret-one", "miss")
    assert w.secret("secretId=db&versionStage=AWSCURRENT") == ("secret-two", "miss")
    assert w.proxy.count(SM_GET) == 4
    assert w.secret("secretId=db") == ("secret-two", "hit")
    assert w.secret("secretId=db&versionStage=AWSPREVIOUS") == ("secret-one", "hit")
    assert w.secret(f"secretId=db&versionId={w.db_v1}") == ("secret-one", "hit")
    assert w.proxy.count(SM_GET) == 4


def test_same_name_encoded_or_not_is_one_entry(world):
    w = world.start()
    assert w.param("name=%2Fa")[1] == "miss"
    assert w.param("name=/a")[1] == "hit"
    assert w.proxy.count(SSM_GET) == 1


def test_parameter_names_are_case_sensitive_keys(world):
    w = world.start()
    w.ssm.put_parameter(Name="/A", Value="upper", Type="String")
    assert w.param("name=%2Fa") == ("value-a", "miss")
    assert w.param("name=%2FA") == ("upper", "miss")


def test_reference_and_secret_route_are_separate_entries(world):
    w = world.start()
    assert w.param("name=%2Faws%2Freference%2Fsecretsmanager%2Fdb&withDecryption=true") == (
        "secret-two", "miss")
    assert w.secret("secretId=db") == ("secret-two", "miss")
    assert w.proxy.count(SSM_GET) == 1 and w.proxy.count(SM_GET) == 1


@pytest.mark.parametrize("flag", ["true", "1"])
def test_refresh_now_fetches_and_updates_the_cache(world, flag):
    w = world.start()
    assert w.param("name=%2Fa")[0] == "value-a"
    w.ssm.put_parameter(Name="/a", Value="changed", Type="String", Overwrite=True)
    assert w.param("name=%2Fa") == ("value-a", "hit")
    assert w.param(f"name=%2Fa&refreshNow={flag}") == ("changed", "miss")
    assert w.param("name=%2Fa") == ("changed", "hit")
    assert w.param("name=%2Fa&refreshNow=false") == ("changed", "hit")
    assert w.proxy.count(SSM_GET) == 2
    # The same for secrets.
    w.secret("secretId=db")
    w.sm.put_secret_value(SecretId="db", SecretString="secret-three")
    assert w.secret(f"secretId=db&refreshNow={flag}") == ("secret-three", "miss")
    assert w.secret("secretId=db") == ("secret-three", "hit")
    assert w.proxy.count(SM_GET) == 2


def test_errors_are_not_cached_and_do_not_evict(world):
    w = world.start(PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE="1")
    w.param("name=%2Fa")
    for _ in range(2):
        w.get(PARAMS + "?name=%2Fmissing", expect_status=400)
        w.get(SECRETS + "?secretId=missing", expect_status=404)
    assert w.proxy.count(SSM_GET) == 3 and w.proxy.count(SM_GET) == 2
    # The one cached item survived: an error never takes a cache slot.
    assert w.param("name=%2Fa") == ("value-a", "hit")


def _concurrently(fn, args_list):
    """Run fn(*args) for each args in threads released together; return results in order."""
    import threading

    barrier = threading.Barrier(len(args_list))
    results = [None] * len(args_list)

    def run(i, args):
        barrier.wait(timeout=10)
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_cold_reads_of_one_key_make_one_call(world):
    # Observed in extension.py and kept: a burst of identical cold requests (e.g. many
    # concurrent invocations sharing the extension) is coalesced into one AWS call.
    w = world.start()
    results = _concurrently(w.param, [("name=%2Fa",)] * 16)
    assert all(value == "value-a" for value, _ in results), results
    assert w.proxy.count(SSM_GET) == 1


def test_concurrent_reads_keep_keys_apart(world):
    # Concurrency must never mix entries: decrypted vs not, version vs latest, and
    # different names, all requested at the same moment.
    w = world.start()
    cases = [
        ("name=%2Fsecure&withDecryption=true", "secure-plain"),
        ("name=%2Fsecure", "kms:alias/aws/ssm:secure-plain"),
        ("name=%2Fversioned", "v-two"),
        ("name=%2Fversioned&version=1", "v-one"),
        ("name=%2Fa", "value-a"),
        ("name=%2Fb", "value-b"),
    ]
    results = _concurrently(w.param, [(query,) for query, _ in cases] * 3)
    for (query, expected), (value, _) in zip(cases * 3, results):
        assert value == expected, (query, value)
    assert w.proxy.count(SSM_GET) == len(cases)
