"""The command line and the start-up lines a person reads: --help (the routes and the
variables), and one clear line for a malformed or unreachable AWS_LAMBDA_RUNTIME_API
(never a traceback)."""

import subprocess
import sys

import pytest

from conftest import EXTENSION, free_port

BASE_ENV = {"AWS_TOKEN": "token-for-cli-tests", "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}


def run(args=(), **env):
    env = dict(BASE_ENV, PARAMETERS_SECRETS_EXTENSION_HTTP_PORT=str(free_port()), **env)
    return subprocess.run([sys.executable, str(EXTENSION), *args], env=env, capture_output=True, text=True,
                          timeout=20)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(flag):
    done = run([flag])
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python3 extension.py [NAME]\n")
    assert done.stderr == ""


def test_help_lists_the_routes_and_every_variable():
    import extension

    done = run(["--help"])
    for route in ("/systemsmanager/parameters/get", "/secretsmanager/get", "/systemsmanager/parameters/get-by-path",
                  "/systemsmanager/parameters/get-multiple", "/secretsmanager/batch-get", "/ping"):
        assert f"GET {route}" in done.stdout, route
    for variable, *_ in extension.SETTINGS:
        assert variable in done.stdout, variable
    assert "AWS_CONTAINER_AUTHORIZATION_TOKEN" in done.stdout and "--exec-with-values" in done.stdout


def test_an_unknown_option_prints_usage_on_stderr_and_exits_2():
    done = run(["--bogus"])
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: python3 extension.py [NAME]\n")


@pytest.mark.parametrize("value", ["not a host:port", "127.0.0.1:", "127.0.0.1", " 127.0.0.1:9001",
                                   "127.0.0.1:99999", "host:port"])
def test_a_malformed_runtime_api_is_one_line_naming_it(value):
    done = run(AWS_LAMBDA_RUNTIME_API=value)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"[parameters-secrets-extension] ERROR AWS_LAMBDA_RUNTIME_API={value!r} is not host:port"]


def test_an_unreachable_extensions_api_is_one_line_naming_the_address():
    port = free_port()  # nothing listens there
    done = run(AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"[parameters-secrets-extension] ERROR POST /register: Extensions API at 127.0.0.1:{port} "
        "unreachable (ConnectionRefusedError)")
    assert "Traceback" not in done.stderr


def test_a_failed_start_is_one_line_naming_the_version():
    # No "version X, listening on ..." line comes when the start fails: the error names
    # the version itself, so that a report of a failed INIT says which extension failed.
    import extension

    env = {key: value for key, value in BASE_ENV.items() if key != "AWS_REGION"}
    done = subprocess.run([sys.executable, str(EXTENSION)], env=dict(env, PARAMETERS_SECRETS_EXTENSION_HTTP_PORT=str(
        free_port())), capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"[parameters-secrets-extension] ERROR version {extension.__version__}: no region: looked for AWS_REGION "
        "and AWS_DEFAULT_REGION"]
