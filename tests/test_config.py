"""Configuration: ``load_config(environ)`` (pure) and what the running extension says about it.

Source of the rules: docs/configuration.md (the official extension's nine variables,
names, defaults and ranges) and README.md (our own variables, the 3600 s TTL ceiling,
the request-token order). Rules checked here:

- every variable: default when absent, valid values taken as given;
- an invalid value: a WARN naming the variable, and the default is used;
- an out-of-range value: clamped to the range, with a WARN naming the variable;
- booleans and log levels in any case; empty strings count as absent;
- AWS_REGION before AWS_DEFAULT_REGION; AWS_TOKEN > AWS_SESSION_TOKEN >
  AWS_CONTAINER_AUTHORIZATION_TOKEN for the request token;
- a near-miss spelling of one of our variables: a WARN naming the intended one (and it
  is not applied), while unrelated variables cause no WARN at all;
- Config is frozen, and its repr() holds no secret.
"""

import re
import types

import pytest

import extension as ext
from conftest import warn_lines

TOKEN = "request-token-cfg-5b1e"
SECRET_KEY = "secret-key-cfg-do-not-log-9f2a"

# The minimal complete environment of a Lambda function (credentials, region, token).
BASE = {
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "ASIAEXAMPLECFG",
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": TOKEN,
}

# (variable, Config field, default) - docs/configuration.md and README.md.
DEFAULTS = [
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS", "ssm_timeout_ms", 0),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS", "secrets_timeout_ms", 0),
    ("SSM_PARAMETER_STORE_TTL", "ssm_ttl", 300),
    ("SECRETS_MANAGER_TTL", "secrets_ttl", 300),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "cache_enabled", True),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "cache_size", 1000),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "port", 2773),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "max_connections", 3),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "log_level", "info"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "max_stale_seconds", 300),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "max_clients", 64),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "read_timeout_ms", 10000),
    ("PARAMETERS_SECRETS_EXTENSION_PREFETCH", "prefetch", ()),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "metrics", "none"),
    ("AWS_LAMBDA_LOG_FORMAT", "log_format", "text"),
]
FIELD = {var: field for var, field, _ in DEFAULTS}
DEFAULT = {var: default for var, _, default in DEFAULTS}
OFFICIAL = DEFAULTS[:9]


def load(**overrides):
    """load_config(BASE + overrides); a value None removes the variable."""
    env = dict(BASE)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    config, messages = ext.load_config(env)
    for entry in messages:
        assert isinstance(entry, tuple) and len(entry) == 2, f"bad message entry {entry!r}"
    return config, messages


def warns(messages):
    return [text for level, text in messages if level.lower().startswith("warn")]


def warns_naming(messages, name):
    return [text for text in warns(messages) if name in text]


# ----------------------------------------------------------------------- defaults


def test_defaults():
    config, messages = load()
    for var, field, default in DEFAULTS:
        assert getattr(config, field) == default, f"{var} -> {field}"
    assert config.region == "us-east-1"
    assert config.request_token == TOKEN
    assert config.ssm_endpoint == "https://ssm.us-east-1.amazonaws.com"
    assert config.secrets_endpoint == "https://secretsmanager.us-east-1.amazonaws.com"
    assert warns(messages) == [], "a complete, correct environment gives no WARN"


def test_absent_variables_are_logged_at_debug():
    # Observed official behaviour (docs/configuration.md): a missing variable is logged at
    # DEBUG as "not present, using default ...".
    _, messages = load()
    debug = [text for level, text in messages if level.lower() == "debug"]
    for var, _, _ in OFFICIAL:
        assert any(var in text for text in debug), f"no DEBUG line about absent {var}"


def test_load_config_is_pure(monkeypatch):
    """Reads only the mapping it is given (not os.environ) and never writes to it."""
    for var, _, _ in DEFAULTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSM_PARAMETER_STORE_TTL", "7")
    monkeypatch.setenv("AWS_TOKEN", "from-os-environ")
    env = types.MappingProxyType(dict(BASE, SECRETS_MANAGER_TTL="9"))  # read-only
    config, _ = ext.load_config(env)
    assert config.ssm_ttl == 300
    assert config.secrets_ttl == 9
    assert config.request_token == TOKEN
    again, _ = ext.load_config(env)
    assert again == config


def test_config_is_frozen_and_its_repr_hides_the_secrets():
    config, _ = load()
    with pytest.raises(AttributeError):
        config.ssm_ttl = 5
    with pytest.raises(AttributeError):
        config.request_token = "other"
    with pytest.raises(AttributeError):
        config.new_field = 1  # no __dict__: nothing can be added either
    assert config.ssm_ttl == 300
    text = repr(config)
    assert "ssm_ttl=300" in text
    for secret in (config.request_token, config.secret_access_key, config.session_token):
        assert secret and secret not in text


# ----------------------------------------------------------------------- valid values

VALID = [
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS", "1500", 1500),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS", "250", 250),
    ("SSM_PARAMETER_STORE_TTL", "0", 0),
    ("SSM_PARAMETER_STORE_TTL", "60", 60),
    ("SSM_PARAMETER_STORE_TTL", "3600", 3600),
    ("SECRETS_MANAGER_TTL", "0", 0),
    ("SECRETS_MANAGER_TTL", "1200", 1200),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "FALSE", False),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "false", False),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "False", False),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "TRUE", True),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "true", True),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "tRuE", True),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "0", 0),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "1", 1),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "1000", 1000),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "1", 1),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "8080", 8080),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "65535", 65535),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "1", 1),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "10", 10),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "debug", "debug"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "DEBUG", "debug"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "Info", "info"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "WARN", "warn"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "error", "error"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "NONE", "none"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "0", 0),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "86400", 86400),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "1", 1),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "1024", 1024),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "100", 100),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "600000", 600000),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "emf", "emf"),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "EMF", "emf"),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "none", "none"),
    ("AWS_LAMBDA_LOG_FORMAT", "JSON", "json"),
    ("AWS_LAMBDA_LOG_FORMAT", "Text", "text"),
]


@pytest.mark.parametrize("var,value,expected", VALID,
                         ids=[f"{v}={x}" for v, x, _ in VALID])
def test_valid_value(var, value, expected):
    config, messages = load(**{var: value})
    assert getattr(config, FIELD[var]) == expected
    assert warns_naming(messages, var) == [], "a valid value deserves no WARN"


def test_prefetch_entries_comma_or_whitespace_separated():
    value = " ssm:/app/db?withDecryption=true,secret:prod/db?versionStage=AWSPREVIOUS\n ssm:plain "
    config, _ = load(PARAMETERS_SECRETS_EXTENSION_PREFETCH=value)
    assert isinstance(config.prefetch, tuple)
    assert config.prefetch == ("ssm:/app/db?withDecryption=true",
                               "secret:prod/db?versionStage=AWSPREVIOUS", "ssm:plain")


# ----------------------------------------------------------------------- invalid values

INVALID = [
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS", "fast"),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS", "1.5"),
    ("SSM_PARAMETER_STORE_TTL", "5m"),
    ("SSM_PARAMETER_STORE_TTL", "abc"),
    ("SECRETS_MANAGER_TTL", "300s"),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "yes-please"),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "lots"),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "http"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "many"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "verbose"),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "trace"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "forever"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "0x40"),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "10s"),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "prometheus"),
]


@pytest.mark.parametrize("var,value", INVALID, ids=[f"{v}={x}" for v, x in INVALID])
def test_invalid_value_warns_and_uses_the_default(var, value):
    config, messages = load(**{var: value})
    assert getattr(config, FIELD[var]) == DEFAULT[var]
    assert warns_naming(messages, var), f"no WARN naming {var}: {messages!r}"


@pytest.mark.parametrize("var", [v for v, _, _ in DEFAULTS if v != "AWS_LAMBDA_LOG_FORMAT"])
def test_empty_value_means_default(var):
    # The Lambda console makes it easy to leave a value empty: treat it as absent.
    config, _ = load(**{var: ""})
    assert getattr(config, FIELD[var]) == DEFAULT[var]


# ----------------------------------------------------------------------- out of range

CLAMPED = [
    # TTL ceiling 3600 s (README.md; the Secrets Manager Agent's ceiling).
    ("SSM_PARAMETER_STORE_TTL", "3601", 3600),
    ("SSM_PARAMETER_STORE_TTL", "99999", 3600),
    ("SECRETS_MANAGER_TTL", "86400", 3600),
    ("SSM_PARAMETER_STORE_TTL", "-1", 0),
    ("SECRETS_MANAGER_TTL", "-300", 0),
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS", "-5", 0),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS", "-1", 0),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "1001", 1000),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "50000", 1000),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "-1", 0),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "0", 1),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "-3", 1),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "100000", 86400),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "-1", 0),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "0", 1),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "5000", 1024),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "10", 100),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "9999999", 600000),
]


@pytest.mark.parametrize("var,value,expected", CLAMPED, ids=[f"{v}={x}" for v, x, _ in CLAMPED])
def test_out_of_range_is_clamped_with_a_warning(var, value, expected):
    config, messages = load(**{var: value})
    assert getattr(config, FIELD[var]) == expected
    assert warns_naming(messages, var), f"no WARN naming {var}: {messages!r}"


@pytest.mark.parametrize("value", ["0", "65536", "-80", "100000"])
def test_port_out_of_range_warns_and_falls_back_to_the_default(value):
    # README.md: an out-of-range port is not clamped (port 1 or 65535 is never what was
    # meant) but replaced by the default, and never silently.
    config, messages = load(PARAMETERS_SECRETS_EXTENSION_HTTP_PORT=value)
    assert config.port == 2773
    assert warns_naming(messages, "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT")


# ----------------------------------------------------------------------- region, tokens


def test_region_precedence():
    config, _ = load(AWS_REGION="eu-west-1", AWS_DEFAULT_REGION="ap-south-1")
    assert config.region == "eu-west-1"
    config, _ = load(AWS_REGION=None, AWS_DEFAULT_REGION="ap-south-1")
    assert config.region == "ap-south-1"
    assert config.ssm_endpoint == "https://ssm.ap-south-1.amazonaws.com"
    config, _ = load(AWS_REGION="", AWS_DEFAULT_REGION="ap-south-1")
    assert config.region == "ap-south-1", "an empty AWS_REGION counts as absent"


def test_cn_region_endpoints():
    config, _ = load(AWS_REGION="cn-north-1")
    assert config.ssm_endpoint == "https://ssm.cn-north-1.amazonaws.com.cn"
    assert config.secrets_endpoint == "https://secretsmanager.cn-north-1.amazonaws.com.cn"


def test_endpoint_override_precedence():
    config, _ = load(AWS_ENDPOINT_URL="http://127.0.0.1:4566")
    assert config.ssm_endpoint.rstrip("/") == "http://127.0.0.1:4566"
    assert config.secrets_endpoint.rstrip("/") == "http://127.0.0.1:4566"
    config, _ = load(AWS_ENDPOINT_URL="http://127.0.0.1:4566",
                     AWS_ENDPOINT_URL_SSM="http://127.0.0.1:5001",
                     AWS_ENDPOINT_URL_SECRETS_MANAGER="http://127.0.0.1:5002")
    assert config.ssm_endpoint.rstrip("/") == "http://127.0.0.1:5001"
    assert config.secrets_endpoint.rstrip("/") == "http://127.0.0.1:5002"


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_fips_any_case(value):
    config, _ = load(AWS_USE_FIPS_ENDPOINT=value)
    assert config.ssm_endpoint == "https://ssm-fips.us-east-1.amazonaws.com"
    assert config.secrets_endpoint == "https://secretsmanager-fips.us-east-1.amazonaws.com"


TOKEN_VARS = ["AWS_TOKEN", "AWS_SESSION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN"]


@pytest.mark.parametrize("present,expected", [
    ({"AWS_TOKEN": "t1", "AWS_SESSION_TOKEN": "t2", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t3"}, "t1"),
    ({"AWS_SESSION_TOKEN": "t2", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t3"}, "t2"),
    ({"AWS_CONTAINER_AUTHORIZATION_TOKEN": "t3"}, "t3"),
    ({"AWS_TOKEN": "t1", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t3"}, "t1"),
    ({"AWS_TOKEN": "", "AWS_SESSION_TOKEN": "t2"}, "t2"),
    ({"AWS_TOKEN": "", "AWS_SESSION_TOKEN": "", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t3"}, "t3"),
], ids=["all-three", "session+container", "container-only", "token+container",
        "empty-aws-token", "empty-both"])
def test_request_token_precedence(present, expected):
    overrides = {var: None for var in TOKEN_VARS}
    overrides.update(present)
    config, _ = load(**overrides)
    assert config.request_token == expected


def test_no_token_at_all_gives_no_request_token():
    # The refusal to start is checked black-box below; here only that nothing is invented.
    try:
        config, _ = load(**{var: None for var in TOKEN_VARS})
    except Exception:  # load_config may refuse by raising: acceptable
        return
    assert not config.request_token


def test_messages_never_contain_the_token_or_the_secret_key():
    # Even with many WARNs about bad values, neither the token nor the key is echoed.
    bad = {var: "bad-value" for var, _ in INVALID}
    bad["AWS_TOKEN"] = "aws-token-cfg-77aa"
    _, messages = load(**bad)
    text = repr(messages)
    for secret in (TOKEN, SECRET_KEY, "aws-token-cfg-77aa"):
        assert secret not in text


# ----------------------------------------------------------------------- near misses

NEAR_MISSES = [
    # docs/configuration.md's example: the silently ignored spelling users lost hours to.
    ("PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE", "5", "PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE"),
    ("SSM_PARAMETER_STORE_TTL_SECONDS", "5", "SSM_PARAMETER_STORE_TTL"),
    ("SSM_PARAMETERS_STORE_TTL", "5", "SSM_PARAMETER_STORE_TTL"),
    ("SECRET_MANAGER_TTL", "5", "SECRETS_MANAGER_TTL"),
    ("SECRETS_MANAGER_TIMEOUT_MILLI", "5", "SECRETS_MANAGER_TIMEOUT_MILLIS"),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORTS", "8080", "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"),
    ("parameters_secrets_extension_log_level", "debug", "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL"),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLE", "FALSE", "PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED"),
    ("PARAMETER_SECRETS_EXTENSION_MAX_CONNECTIONS", "9", "PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS"),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECOND", "5", "PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS"),
    # The SDKs' name has an underscore in SECRETS_MANAGER; without it the override is lost.
    ("AWS_ENDPOINT_URL_SECRETSMANAGER", "http://127.0.0.1:5002", "AWS_ENDPOINT_URL_SECRETS_MANAGER"),
]
NEAR_MISS_FIELD = dict(FIELD, AWS_ENDPOINT_URL_SECRETS_MANAGER="secrets_endpoint")


@pytest.mark.parametrize("wrong,value,intended", NEAR_MISSES, ids=[w for w, _, _ in NEAR_MISSES])
def test_near_miss_spelling_warns_naming_the_intended_variable(wrong, value, intended):
    config, messages = load(**{wrong: value})
    hits = warns_naming(messages, intended)
    assert hits, f"no WARN naming {intended} for {wrong}: {messages!r}"
    assert any(wrong in text for text in hits), "the WARN should also name what was written"
    # Not applied: the extension uses exactly the official names (as the official one).
    field = NEAR_MISS_FIELD[intended]
    assert getattr(config, field) == getattr(ext.load_config(dict(BASE))[0], field)


UNRELATED = [
    "PATH", "HOME", "LANG", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_RUNTIME_API", "AWS_EXECUTION_ENV", "LAMBDA_TASK_ROOT", "_HANDLER",
    "MY_APP_TTL", "CACHE_SIZE", "DB_SECRET_NAME", "SSM_PARAMETER_NAME", "SECRETS_PREFIX",
    "AWS_XRAY_DAEMON_ADDRESS", "PYTHONPATH",
]


def test_unrelated_variables_cause_no_warning():
    env = {name: "1" for name in UNRELATED}
    env.update(BASE)
    env["AWS_REGION"] = "us-east-1"
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    config, messages = ext.load_config(env)
    assert warns(messages) == [], f"unexpected WARN(s): {warns(messages)!r}"


def test_every_correct_name_causes_no_warning():
    env = dict(BASE)
    for var, value, _ in VALID:
        env[var] = value
    env["PARAMETERS_SECRETS_EXTENSION_PREFETCH"] = "ssm:/a"
    env["AWS_TOKEN"] = "t"
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    _, messages = ext.load_config(env)
    assert warns(messages) == [], f"unexpected WARN(s): {warns(messages)!r}"


# ----------------------------------------------------------------------- black box

UNREACHABLE = "http://127.0.0.1:9"  # nothing is fetched in these tests


def test_running_extension_warns_about_a_misspelled_variable(start_extension):
    ext_proc = start_extension(UNREACHABLE, env={
        "PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE": "5",
        "SSM_PARAMETER_STORE_TTL": "99999",
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info",
    })
    stderr = ext_proc.stderr()
    lines = warn_lines(stderr)
    assert any("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE" in line
               and "PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE" in line for line in lines), stderr
    assert any("SSM_PARAMETER_STORE_TTL" in line and "3600" in line for line in lines), stderr
    # Warnings are not fatal: it serves, and stops cleanly on SIGTERM.
    status, _, _ = ext_proc.get("/ping", token=None)
    assert status == 200
    assert ext_proc.stop() == 0, f"exit code on SIGTERM; stderr:\n{ext_proc.stderr()}"


@pytest.mark.parametrize("overrides,word", [
    ({"AWS_SESSION_TOKEN": None}, "token"),
    ({"AWS_SESSION_TOKEN": ""}, "token"),
    ({"AWS_REGION": None}, "region"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "credential"),
    ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "credential"),
], ids=["no-token", "empty-token", "no-region", "no-credentials", "empty-credentials"])
def test_refuses_to_start(start_extension_raw, overrides, word):
    """README.md: exit code 2 and one clear ERROR line; it never serves unauthenticated."""
    env = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_TOKEN": None}
    env.update(overrides)
    ext_proc = start_extension_raw(UNREACHABLE, env=env)
    stderr = ext_proc.stderr()
    assert ext_proc.proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert errors, f"no ERROR line on stderr: {stderr!r}"
    assert any(word in line.lower() for line in errors), stderr
    assert "Traceback" not in stderr
    assert SECRET_KEY not in stderr + ext_proc.stdout()


# ------------------------------------------------------------ the one settings table


def test_the_docstring_table_matches_the_settings_table():
    # The top docstring is what an auditor reads first; ext.SETTINGS is what runs.
    doc = ext.__doc__
    for variable, _, default, _ in ext.SETTINGS:
        assert re.search(rf"^    {variable} +{re.escape(str(default))} ", doc, re.MULTILINE | re.IGNORECASE), \
            f"{variable} with default {default} is not in the docstring's table"
    listed = set(re.findall(r"^    ((?:PARAMETERS_SECRETS_EXTENSION|SSM|SECRETS_MANAGER)_[A-Z_]+)", doc, re.MULTILINE))
    assert listed == {row[0] for row in ext.SETTINGS} | {
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH", "PARAMETERS_SECRETS_EXTENSION_PYTHON"}


def test_config_defaults_come_from_the_settings_table():
    config = ext.Config()
    for _, field, default, accepted in ext.SETTINGS:
        expected = default == "true" if accepted == ("true", "false") else default
        assert getattr(config, field) == expected


@pytest.mark.parametrize("raw", [None, "", "2773", "8080", " 8080 ", "+8080", "-1", "0", "1", "65535", "65536",
                                 "70000", "80.5", "1_000", "0x50", "\u0663\u0660", "abc", "\t443\n"])
def test_the_early_start_reads_the_port_as_load_config_does(raw):
    # The early start binds before load_config (and its imports) exists: same rule.
    environ = {} if raw is None else {"PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": raw}
    config, _ = ext.load_config(environ)
    assert ext.listening_port(environ) == config.port
