"""Which AWS endpoint the extension calls: partitions, FIPS, overrides.

Two layers:

* pure tests of ``extension.endpoint_url(service, region, environ)`` (README.md). The
  oracle for the real AWS host names is botocore's own endpoint resolution (the
  endpoint rule sets AWS ships with every SDK): for each region x service x FIPS the test
  builds a boto3 client and compares ``client.meta.endpoint_url``. A few literal URLs
  are pinned as well, so that the table cannot silently drift with botocore.
  Known irregularity (botocore's ssm endpoint rules, and AWS's FIPS endpoint list):
  in GovCloud the standard SSM endpoint is already FIPS validated, so with FIPS on
  it stays ``ssm.us-gov-west-1.amazonaws.com``, while Secrets Manager switches to
  ``secretsmanager-fips.us-gov-west-1.amazonaws.com``.
* black-box tests that the per-service overrides are really used (and a trailing slash
  does not produce a ``//`` request path). Nothing here ever contacts a real AWS host:
  the pure tests only compute strings, the black-box tests override every endpoint to
  127.0.0.1.
"""

import urllib.parse

import pytest

import extension
from conftest import SM_GET, SSM_GET

SERVICES = ("ssm", "secretsmanager")

# aws, aws-cn and aws-us-gov partitions (the ones Lambda runs in for this layer),
# plus regions botocore does not list explicitly but the partition regexes cover.
REGIONS = (
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-2",
    "ap-southeast-2",
    "ca-central-1",
    "il-central-1",
    "me-central-1",
    "sa-east-1",
    "eu-south-9",  # a future region: must follow the aws partition's pattern
    "cn-north-1",
    "cn-northwest-1",
    "us-gov-west-1",
    "us-gov-east-1",
)

# Literal expectations (from botocore 1.44's endpoint rules, checked when this file was
# written) so a botocore upgrade cannot change what is being asserted unnoticed.
PINNED = {
    ("ssm", "us-east-1", False): "https://ssm.us-east-1.amazonaws.com",
    ("secretsmanager", "us-east-1", False): "https://secretsmanager.us-east-1.amazonaws.com",
    ("ssm", "us-east-1", True): "https://ssm-fips.us-east-1.amazonaws.com",
    ("secretsmanager", "us-east-1", True): "https://secretsmanager-fips.us-east-1.amazonaws.com",
    ("ssm", "eu-west-1", False): "https://ssm.eu-west-1.amazonaws.com",
    ("ssm", "cn-north-1", False): "https://ssm.cn-north-1.amazonaws.com.cn",
    ("secretsmanager", "cn-north-1", False): "https://secretsmanager.cn-north-1.amazonaws.com.cn",
    ("ssm", "cn-northwest-1", False): "https://ssm.cn-northwest-1.amazonaws.com.cn",
    ("secretsmanager", "cn-northwest-1", False):
        "https://secretsmanager.cn-northwest-1.amazonaws.com.cn",
    ("ssm", "us-gov-west-1", False): "https://ssm.us-gov-west-1.amazonaws.com",
    ("secretsmanager", "us-gov-west-1", False): "https://secretsmanager.us-gov-west-1.amazonaws.com",
    ("ssm", "us-gov-west-1", True): "https://ssm.us-gov-west-1.amazonaws.com",
    ("secretsmanager", "us-gov-west-1", True):
        "https://secretsmanager-fips.us-gov-west-1.amazonaws.com",
    ("ssm", "us-gov-east-1", True): "https://ssm.us-gov-east-1.amazonaws.com",
    ("secretsmanager", "us-gov-east-1", True):
        "https://secretsmanager-fips.us-gov-east-1.amazonaws.com",
}

_SDK_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SSM",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@pytest.fixture(scope="module")
def botocore_endpoint(tmp_path_factory):
    """``botocore_endpoint(service, region, fips) -> URL`` as botocore resolves it.

    Runs with the developer's AWS_* settings and config files masked, so only the
    arguments decide.
    """
    import boto3
    from botocore.config import Config

    mp = pytest.MonkeyPatch()
    for name in _SDK_ENV_VARS:
        mp.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("awscfg") / "none"
    mp.setenv("AWS_CONFIG_FILE", str(empty))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    session = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="y")
    cache = {}

    def resolve(service, region, fips):
        key = (service, region, fips)
        if key not in cache:
            client = session.client(
                service, region_name=region, config=Config(use_fips_endpoint=fips)
            )
            cache[key] = client.meta.endpoint_url
        return cache[key]

    yield resolve
    mp.undo()


def _ep(service, region, **env):
    return extension.endpoint_url(service, region, env)


# ------------------------------------------------------------- partitions and FIPS


@pytest.mark.parametrize("fips", [False, True], ids=["standard", "fips"])
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("service", SERVICES)
def test_default_endpoint_matches_botocore(botocore_endpoint, service, region, fips):
    env = {"AWS_USE_FIPS_ENDPOINT": "true"} if fips else {}
    expected = botocore_endpoint(service, region, fips)
    assert extension.endpoint_url(service, region, env) == expected


@pytest.mark.parametrize("key,url", sorted(PINNED.items()), ids=lambda v: str(v))
def test_pinned_endpoints(key, url):
    service, region, fips = key
    env = {"AWS_USE_FIPS_ENDPOINT": "true"} if fips else {}
    assert extension.endpoint_url(service, region, env) == url


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_fips_flag_is_case_insensitive(value):
    assert _ep("ssm", "us-east-1", AWS_USE_FIPS_ENDPOINT=value) == (
        "https://ssm-fips.us-east-1.amazonaws.com"
    )
    assert _ep("secretsmanager", "eu-west-1", AWS_USE_FIPS_ENDPOINT=value) == (
        "https://secretsmanager-fips.eu-west-1.amazonaws.com"
    )


@pytest.mark.parametrize("value", ["false", "FALSE", ""])
def test_fips_flag_off(value):
    assert _ep("ssm", "us-east-1", AWS_USE_FIPS_ENDPOINT=value) == (
        "https://ssm.us-east-1.amazonaws.com"
    )
    assert _ep("secretsmanager", "us-east-1", AWS_USE_FIPS_ENDPOINT=value) == (
        "https://secretsmanager.us-east-1.amazonaws.com"
    )


def test_endpoint_url_is_pure(monkeypatch):
    """It reads only the mapping it is given, never os.environ."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", "true")
    assert _ep("ssm", "us-east-1") == "https://ssm.us-east-1.amazonaws.com"


# ------------------------------------------------------------------- overrides


def test_global_override_applies_to_both_services():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:4566"}
    assert extension.endpoint_url("ssm", "us-east-1", env) == "http://127.0.0.1:4566"
    assert extension.endpoint_url("secretsmanager", "us-east-1", env) == "http://127.0.0.1:4566"


def test_service_overrides_beat_the_global_one():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1111",
        "AWS_ENDPOINT_URL_SSM": "http://127.0.0.1:2222",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": "http://localhost:3333",
    }
    assert extension.endpoint_url("ssm", "us-east-1", env) == "http://127.0.0.1:2222"
    assert extension.endpoint_url("secretsmanager", "us-east-1", env) == "http://localhost:3333"


def test_one_service_override_leaves_the_other_service_alone():
    env = {"AWS_ENDPOINT_URL_SSM": "http://127.0.0.1:2222"}
    assert extension.endpoint_url("ssm", "eu-west-1", env) == "http://127.0.0.1:2222"
    assert extension.endpoint_url("secretsmanager", "eu-west-1", env) == (
        "https://secretsmanager.eu-west-1.amazonaws.com"
    )
    env = {"AWS_ENDPOINT_URL_SECRETS_MANAGER": "https://vpce-1.secretsmanager.example"}
    assert extension.endpoint_url("ssm", "eu-west-1", env) == "https://ssm.eu-west-1.amazonaws.com"
    assert extension.endpoint_url("secretsmanager", "eu-west-1", env) == (
        "https://vpce-1.secretsmanager.example"
    )
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1111",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": "http://127.0.0.1:3333",
    }
    assert extension.endpoint_url("ssm", "us-east-1", env) == "http://127.0.0.1:1111"
    assert extension.endpoint_url("secretsmanager", "us-east-1", env) == "http://127.0.0.1:3333"


def test_override_beats_fips_and_partition():
    """An explicit endpoint is used as is (botocore does the same): FIPS and region
    only pick the default host."""
    env = {"AWS_ENDPOINT_URL": "https://vpce-0abc.ssm.example", "AWS_USE_FIPS_ENDPOINT": "true"}
    assert extension.endpoint_url("ssm", "cn-north-1", env) == "https://vpce-0abc.ssm.example"
    assert extension.endpoint_url("secretsmanager", "us-gov-west-1", env) == (
        "https://vpce-0abc.ssm.example"
    )


def test_override_matches_botocore(monkeypatch, tmp_path):
    """Cross-check the precedence with botocore's own reading of the same variables."""
    import boto3

    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1111",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": "http://127.0.0.1:3333",
    }
    for name in _SDK_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    session = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="y")
    for service in SERVICES:
        expected = session.client(service, region_name="us-east-1").meta.endpoint_url
        assert extension.endpoint_url(service, "us-east-1", env) == expected


@pytest.mark.parametrize(
    "name", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_SECRETS_MANAGER"]
)
def test_empty_override_is_absent(name):
    """An empty variable counts as unset (as Lambda's empty AWS_* variables do)."""
    env = {name: ""}
    assert extension.endpoint_url("ssm", "us-east-1", env) == "https://ssm.us-east-1.amazonaws.com"
    assert extension.endpoint_url("secretsmanager", "us-east-1", env) == (
        "https://secretsmanager.us-east-1.amazonaws.com"
    )


@pytest.mark.parametrize("slashes", ["/", "//"])
def test_trailing_slash_is_dropped(slashes):
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:4566" + slashes,
        "AWS_ENDPOINT_URL_SSM": "https://vpce-1.ssm.example" + slashes,
    }
    assert extension.endpoint_url("ssm", "us-east-1", env) == "https://vpce-1.ssm.example"
    assert extension.endpoint_url("secretsmanager", "us-east-1", env) == "http://127.0.0.1:4566"


def test_load_config_uses_endpoint_url():
    """The Config the server runs with carries the same URLs."""
    env = {
        "AWS_REGION": "cn-northwest-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_USE_FIPS_ENDPOINT": "false",
    }
    config, _ = extension.load_config(env)
    assert config.region == "cn-northwest-1"
    assert config.ssm_endpoint == "https://ssm.cn-northwest-1.amazonaws.com.cn"
    assert config.secrets_endpoint == "https://secretsmanager.cn-northwest-1.amazonaws.com.cn"

    env = dict(env, AWS_REGION="us-gov-west-1", AWS_USE_FIPS_ENDPOINT="true",
               AWS_ENDPOINT_URL_SSM="http://127.0.0.1:2222/")
    config, _ = extension.load_config(env)
    assert config.ssm_endpoint == "http://127.0.0.1:2222"
    assert config.secrets_endpoint == "https://secretsmanager-fips.us-gov-west-1.amazonaws.com"

    # AWS_REGION wins over AWS_DEFAULT_REGION; the latter is the fallback.
    env = dict(env, AWS_REGION="", AWS_DEFAULT_REGION="eu-west-1", AWS_USE_FIPS_ENDPOINT="",
               AWS_ENDPOINT_URL_SSM="")
    config, _ = extension.load_config(env)
    assert config.region == "eu-west-1"
    assert config.ssm_endpoint == "https://ssm.eu-west-1.amazonaws.com"


# ------------------------------------------------------------------- black box


def test_per_service_overrides_are_used(moto, ssm, secretsmanager, counting_proxy,
                                        start_extension):
    """SSM calls go to AWS_ENDPOINT_URL_SSM, secret reads to
    AWS_ENDPOINT_URL_SECRETS_MANAGER; the global AWS_ENDPOINT_URL (a closed loopback
    port here) is not used for either."""
    ssm.put_parameter(Name="/ep/p", Value="v", Type="String")
    secretsmanager.create_secret(Name="ep/s", SecretString="s3cr3t-ep")
    ssm_proxy = counting_proxy(moto)
    sm_proxy = counting_proxy(moto)
    ext = start_extension(
        "http://127.0.0.1:9",
        env={
            "AWS_ENDPOINT_URL_SSM": ssm_proxy.url,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": sm_proxy.url + "/",
        },
    )
    status, _, body = ext.get_json("/systemsmanager/parameters/get?name=%2Fep%2Fp")
    assert status == 200, body
    assert body["Parameter"]["Value"] == "v"
    status, _, body = ext.get_json("/secretsmanager/get?secretId=ep%2Fs")
    assert status == 200, body
    assert body["SecretString"] == "s3cr3t-ep"
    assert ssm_proxy.count() == 1 and ssm_proxy.count(SSM_GET) == 1
    assert sm_proxy.count() == 1 and sm_proxy.count(SM_GET) == 1
    # The trailing "/" of the override must not produce a "//" request path.
    assert [r["path"] for r in sm_proxy.requests] == ["/"]
    assert [r["path"] for r in ssm_proxy.requests] == ["/"]
    # The signed Host is the override's host:port.
    host = dict((k.lower(), v) for k, v in sm_proxy.requests[0]["headers"])["host"]
    assert host == urllib.parse.urlsplit(sm_proxy.url).netloc


def test_global_override_with_trailing_slash(moto, ssm, counting_proxy, start_extension):
    ssm.put_parameter(Name="slash", Value="ok", Type="String")
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url + "/")
    status, _, body = ext.get_json("/systemsmanager/parameters/get?name=slash")
    assert status == 200, body
    assert body["Parameter"]["Value"] == "ok"
    assert [r["path"] for r in proxy.requests] == ["/"]


@pytest.mark.parametrize("value", ["127.0.0.1:4566", "ftp://127.0.0.1:4566", "http://"])
def test_unusable_override_refuses_to_start(start_extension_raw, value):
    """A malformed endpoint override is a configuration error reported at start
    (exit 2, one ERROR line naming the variable), not a failure on every request.
    (our choice, documented in docs/configuration.md, "Refusing to start")"""
    ext = start_extension_raw(None, env={"AWS_ENDPOINT_URL_SSM": value,
                                         "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert ext.proc.returncode == 2, ext.stderr()
    errors = [line for line in ext.stderr().splitlines() if "ERROR" in line]
    assert errors, ext.stderr()
    assert any("AWS_ENDPOINT_URL_SSM" in line for line in errors), ext.stderr()
