"""Values in environment variables: the layer's runtime wrapper.

Contract (docs/env-values.md): with ``AWS_LAMBDA_EXEC_WRAPPER=/opt/<name>/wrapper``,
Lambda starts the runtime as ``wrapper <runtime command...>`` once every extension has
registered (docs/design.md, "The Lambda Extensions API"). The wrapper replaces every
``{{ssm:<name>[?query]}}`` and ``{{secret:<id>[?query]}}`` in the environment by its value,
fetched through the running extension over HTTP (so cached and counted like any request;
each distinct reference once), then execs the runtime command: same PID, same directory,
every other variable byte for byte. Query keys: withDecryption, version, label (ssm);
versionId, versionStage (secret); jsonKey (both: the value must be a JSON object; a string
key value goes in as it is, anything else as JSON text). A reference that cannot be
resolved, or a malformed one, ends the start: one line on stderr naming the variable, the
reference and the error type (AWS's ``__type``), never a value; non-zero exit, so Lambda
reports an init failure. ``{{resolve:...}}`` and ``${ssm:...}`` are left alone. Without
the wrapper setting nothing changes.

The black-box tests run the built layer in the fake Lambda (tests/fake_lambda.py, which
starts ``$AWS_LAMBDA_EXEC_WRAPPER <runtime command...>`` as Lambda does) against moto;
the rest drive extension.py's functions in process, and the wrapper script directly.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

import extension
from conftest import ROOT, SM_GET, SSM_GET, free_port
from test_lifecycle import lambda_env

NAME = "parameters-secrets-extension"
WRAPPER = ROOT / "wrapper"
BOOTSTRAP = ROOT / "bootstrap"
# What the shell that runs the wrapper (#!/bin/sh) exports by itself: dash adds PWD, bash
# also SHLVL and _ (docs/pitfalls.md, "A runtime wrapper changes the runtime's environment").
SHELL_VARIABLES = {b"PWD", b"SHLVL", b"_"}

HOST = "db.internal"
API_KEY_V1 = "key-one-\u00e9"
API_KEY_V2 = "key-two"
OLD_DB = {"username": "app", "password": "old-Pa55word", "port": 5432}
DB = {"username": "app", "password": "p@ss:w/rd&x=1", "port": 5432, "options": {"ssl": True}}
SECRET_TEXTS = ("p@ss:w/rd", "old-Pa55word", API_KEY_V1, API_KEY_V2)

# The function: records its whole environment as bytes (hex, so that JSON carries any
# byte), its directory and PID at INIT, and asks the extension for the secret the
# wrapper resolved, to see whether it was a cache hit.
HANDLER = """\
import json
import os
import urllib.request

ENVIRONMENT = {key.hex(): value.hex() for key, value in os.environb.items()}
CWD = os.getcwd()
PID = os.getpid()
open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], "imported"), "w").close()


def handler(event, context):
    request = urllib.request.Request(
        "http://127.0.0.1:%s/secretsmanager/get?secretId=prod%%2Fdb"
        % os.environ["PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"])
    request.add_header("X-Aws-Parameters-Secrets-Token", os.environ["AWS_SESSION_TOKEN"])
    with urllib.request.urlopen(request) as answer:
        cache = answer.headers["X-Parameters-Secrets-Cache"]
    return {"environment": ENVIRONMENT, "cwd": CWD, "pid": PID, "cache": cache}
"""


@pytest.fixture
def make_lambda(lambda_factory):
    def make(env):
        return lambda_factory(env, {"handler.py": HANDLER})

    return make


@pytest.fixture
def seeded(ssm, secretsmanager):
    ssm.put_parameter(Name="/app/host", Value=HOST, Type="String")
    ssm.put_parameter(Name="/app/api-key", Value=API_KEY_V1, Type="SecureString")
    ssm.put_parameter(Name="/app/api-key", Value=API_KEY_V2, Type="SecureString", Overwrite=True)
    ssm.label_parameter_version(Name="/app/api-key", ParameterVersion=1, Labels=["stable"])
    secretsmanager.create_secret(Name="prod/db", SecretString=json.dumps(OLD_DB))
    secretsmanager.put_secret_value(SecretId="prod/db", SecretString=json.dumps(DB))


def wrapped_env(endpoint_url, home, **variables):
    env = lambda_env(endpoint_url, home, port=free_port(), PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL="info",
                     AWS_LAMBDA_EXEC_WRAPPER=f"/opt/{NAME}/wrapper")
    env.update(variables)
    return env


def pointed_at_opt(lam, env):
    """The fake unpacks the layer into <workdir>/opt: the wrapper setting names it there."""
    wrapper = env.get("AWS_LAMBDA_EXEC_WRAPPER")
    if wrapper:
        lam.user_env["AWS_LAMBDA_EXEC_WRAPPER"] = wrapper.replace("/opt/", lam.opt_dir + "/", 1)
    return lam


def seen_environment(payload):
    return {bytes.fromhex(key): bytes.fromhex(value) for key, value in payload["environment"].items()}


def expected_environment(lam):
    return {os.fsencode(key): os.fsencode(value) for key, value in lam.function_env().items()}


def runtime_lines(lam):
    return lam.logs("runtime").splitlines()


# ------------------------------------------------------------------ through the fake Lambda


def test_the_function_sees_the_values_and_everything_else_unchanged(make_lambda, seeded, moto, counting_proxy,
                                                                       tmp_path):
    proxy = counting_proxy(moto)
    variables = {
        # Several references in one value, text around them; three jsonKeys of one secret.
        "DB_URL": "postgres://{{secret:prod/db?jsonKey=username}}:{{secret:prod/db?jsonKey=password}}"
                  "@{{ssm:/app/host}}:{{secret:prod/db?jsonKey=port}}/app?x={{secret:prod/db?jsonKey=options}}",
        "API_KEY": "{{ssm:/app/api-key?withDecryption=true}}",
        "API_KEY_V1": "{{ssm:/app/api-key?withDecryption=true&version=1}}",
        "API_KEY_STABLE": "{{ssm:/app/api-key?label=stable&withDecryption=true}}",
        "OLD_DB_PASSWORD": "{{secret:prod/db?versionStage=AWSPREVIOUS&jsonKey=password}}",
        "DB_JSON": "{{secret:prod/db}}",
        # Left alone: other tools' syntaxes, other cases, no reference at all.
        "OTHERS": "{{resolve:ssm:/app/host}} ${ssm:/app/host} {{SSM:/app/host}} {{ ssm:/app/host }} {{",
        "PLAIN": "nothing to see",
        # Bytes that are not UTF-8, without and with a reference.
        "RAW": b"caf\xe9 \xff{{ }}",
        "RAW_WITH_REFERENCE": b"\xff{{ssm:/app/host}}\xfe",
    }
    env = wrapped_env(proxy.url, tmp_path, **variables)
    lam = pointed_at_opt(make_lambda(env), env)
    init = lam.start()
    assert init.ok, f"{init}\n{lam.logs()}"
    result = lam.invoke({})
    assert result.status == "success", f"{result}\n{lam.logs()}"
    seen = seen_environment(result.payload)

    resolved = {
        b"DB_URL": f"postgres://app:{DB['password']}@{HOST}:5432/app?x={{\"ssl\": true}}".encode(),
        b"API_KEY": API_KEY_V2.encode(),
        b"API_KEY_V1": API_KEY_V1.encode(),
        b"API_KEY_STABLE": API_KEY_V1.encode(),
        b"OLD_DB_PASSWORD": OLD_DB["password"].encode(),
        b"DB_JSON": json.dumps(DB).encode(),
        b"RAW_WITH_REFERENCE": b"\xff" + HOST.encode() + b"\xfe",
    }
    expected = expected_environment(lam)
    for name, value in resolved.items():
        assert seen[name] == value, name
    # Every other variable byte for byte; nothing missing; nothing added but what the
    # shell running the wrapper exports itself (PWD, here the unchanged directory).
    for name, value in expected.items():
        if name not in resolved:
            assert seen.get(name) == value, name
    assert set(seen) - set(expected) <= SHELL_VARIABLES
    if b"PWD" in seen and b"PWD" not in expected:
        assert seen[b"PWD"] == lam.task_dir.encode()
    # exec all the way: the runtime has the PID Lambda started and the directory it gave.
    assert result.payload["pid"] == lam.runtime_proc.pid
    assert result.payload["cwd"] == lam.task_dir
    # Each distinct reference fetched once (the four jsonKeys of prod/db: one call), through
    # the extension's cache: the function's own request for prod/db is a hit.
    assert proxy.count(SSM_GET) == 4, proxy.calls
    assert proxy.count(SM_GET) == 2, proxy.calls
    assert result.payload["cache"] == "hit"
    # Counted like any request, each once: the wrapper's ten distinct references (the
    # repeated /app/host asked once) and the function's own request. They are made
    # concurrently, so which are hits depends on timing: a request that finds the value
    # cached is a hit, one that waits for another's AWS call a miss, like that call's.
    shutdown = lam.shutdown()
    assert shutdown.exits[NAME][0] == 0, lam.logs()
    summaries = [line for line in lam.logs(f"ext-{NAME}").splitlines() if " INFO summary: " in line]
    assert len(summaries) == 1
    counted = re.fullmatch(rf"\[{NAME}\] INFO summary: hits=(\d+) misses=(\d+) aws_calls=6 errors=0 stale=0 "
                           rf"refreshed_ahead=0 version={re.escape(extension.__version__)}", summaries[0])
    assert counted, summaries[0]
    hits, misses = map(int, counted.groups())
    assert hits + misses == 11 and hits >= 1 and misses >= 6, (hits, misses)
    # Silent when all is well (log level info), and never a value in any log.
    assert runtime_lines(lam) == []
    logs = lam.logs()
    for text in SECRET_TEXTS:
        assert text not in logs


def test_an_unresolvable_reference_fails_the_init_in_one_line(make_lambda, seeded, moto, tmp_path):
    env = wrapped_env(moto, tmp_path, MISSING="x{{ssm:/does/not/exist?withDecryption=true}}y",
                      PASSWORD="{{secret:prod/db?jsonKey=password}}", ZONE="{{secret:nope}}")
    lam = pointed_at_opt(make_lambda(env), env)
    init = lam.start()
    assert not init.ok
    assert init.error_type == "Runtime.ExitError", init
    assert lam.runtime_exit == 1
    # The first failing variable in name order, its reference as written, AWS's error type.
    assert runtime_lines(lam) == [
        f"[{NAME}] ERROR environment variable MISSING: {{{{ssm:/does/not/exist?withDecryption=true}}}}: "
        "ParameterNotFound: Parameter /does/not/exist not found.; the runtime is not started"]
    assert not os.path.exists(os.path.join(lam.task_dir, "imported"))  # the runtime never ran
    logs = lam.logs()
    for text in SECRET_TEXTS:
        assert text not in logs
    assert env["AWS_SESSION_TOKEN"] not in logs


def test_a_malformed_reference_fails_the_init_before_any_fetch(make_lambda, moto, counting_proxy, tmp_path):
    proxy = counting_proxy(moto)
    env = wrapped_env(proxy.url, tmp_path, API_KEY="{{ssm:/app/api-key?withdecryption=true}}")
    lam = pointed_at_opt(make_lambda(env), env)
    init = lam.start()
    assert not init.ok and init.error_type == "Runtime.ExitError", init
    assert runtime_lines(lam) == [
        f"[{NAME}] ERROR environment variable API_KEY: {{{{ssm:/app/api-key?withdecryption=true}}}}: "
        "UnknownQueryKey: unknown query key 'withdecryption'; did you mean 'withDecryption'?; "
        "the runtime is not started"]
    assert proxy.count() == 0


def test_without_the_wrapper_setting_nothing_changes(make_lambda, seeded, moto, tmp_path):
    env = wrapped_env(moto, tmp_path, DB_URL="postgres://{{secret:prod/db?jsonKey=password}}@h/app",
                      RAW=b"caf\xe9")
    del env["AWS_LAMBDA_EXEC_WRAPPER"]
    lam = make_lambda(env)
    assert lam.start().ok, lam.logs()
    result = lam.invoke({})
    assert result.status == "success", f"{result}\n{lam.logs()}"
    assert seen_environment(result.payload) == expected_environment(lam)
    assert seen_environment(result.payload)[b"DB_URL"] == b"postgres://{{secret:prod/db?jsonKey=password}}@h/app"


# ------------------------------------------------------------------ the wrapper script


def functions(text):
    """{name: source} of the top-level shell functions of a script."""
    return {match.group(1): match.group(0) for match in re.finditer(r"(?ms)^([a-z_0-9]+)\(\) \{\n.*?^\}\n", text)}


def test_the_wrapper_chooses_python_with_bootstraps_own_code():
    # One choice of interpreter for the extension and the wrapper: the copies are identical.
    ours, theirs = functions(WRAPPER.read_text()), functions(BOOTSTRAP.read_text())
    shared = ("log", "json_escape", "say", "err", "is_python39", "find_python")
    for name in shared:
        assert ours[name] == theirs[name], name
    assert "var_lang_python=/var/lang/bin/python3\n" in WRAPPER.read_text()


def unpacked_layer(layer_zip, tmp_path):
    import zipfile

    opt = tmp_path / "opt"
    with zipfile.ZipFile(layer_zip) as zf:
        for info in zf.infolist():
            target = opt / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            target.chmod((info.external_attr >> 16) & 0o777)
    return opt / NAME / "wrapper"


def run_wrapper(wrapper, command, env, cwd):
    return subprocess.run([str(wrapper), *command], env=env, cwd=cwd, capture_output=True, timeout=30)


def test_the_wrapper_hands_on_the_environment_byte_for_byte(layer_zip, tmp_path):
    """No references: the command gets exactly the environment (plus the shell's PWD),
    in the directory it was started in. LANG and LC_CTYPE unset: Python would set
    LC_CTYPE=C.UTF-8 in its own environment (PEP 538); the runtime must not inherit it."""
    env_binary = shutil.which("env")
    if env_binary is None:
        pytest.skip("no env(1)")
    wrapper = unpacked_layer(layer_zip, tmp_path)
    env = {b"PATH": b"/usr/bin:/bin", b"PARAMETERS_SECRETS_EXTENSION_PYTHON": os.fsencode(sys.executable),
           b"RAW": b"caf\xe9\xff", b"EMPTY": b"", b"BRACES": b"{{ {{resolve:x}} ${ssm:/x}",
           b"NEWLINES": b"a\nb=c\n"}
    done = run_wrapper(wrapper, [env_binary, "-0"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    seen = dict(entry.split(b"=", 1) for entry in done.stdout.split(b"\0") if entry)
    assert {name: value for name, value in seen.items() if name not in SHELL_VARIABLES} == env
    assert seen.get(b"PWD", str(tmp_path).encode()) == str(tmp_path).encode()
    assert done.stderr == b""


def test_the_wrapper_keeps_an_explicit_lc_ctype(layer_zip, tmp_path):
    wrapper = unpacked_layer(layer_zip, tmp_path)
    # LC_CTYPE=C: the wrapper's Python coerces its own copy to C.UTF-8 (PEP 538); the
    # runtime gets "C", as set.
    env = {"PATH": "/usr/bin:/bin", "PARAMETERS_SECRETS_EXTENSION_PYTHON": sys.executable, "LC_CTYPE": "C"}
    done = run_wrapper(wrapper, ["/bin/sh", "-c", 'printf %s "$LC_CTYPE"'], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"C"


def test_the_wrapper_without_a_command_says_so(layer_zip, tmp_path):
    wrapper = unpacked_layer(layer_zip, tmp_path)
    done = run_wrapper(wrapper, [], {"PATH": "/usr/bin:/bin"}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"[{NAME}] ERROR wrapper: no runtime command to start (Lambda runs AWS_LAMBDA_EXEC_WRAPPER with it)"]


def test_the_wrapper_refuses_a_bad_python_override(layer_zip, tmp_path):
    wrapper = unpacked_layer(layer_zip, tmp_path)
    done = run_wrapper(wrapper, ["/bin/true"], {"PATH": "/usr/bin:/bin", "DB": "{{secret:db}}",
                                                "PARAMETERS_SECRETS_EXTENSION_PYTHON": "/nonexistent/python"},
                       tmp_path)
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "PARAMETERS_SECRETS_EXTENSION_PYTHON=/nonexistent/python" in lines[0]


def test_without_references_the_wrapper_starts_no_python(layer_zip, tmp_path):
    # Nothing to resolve: the runtime is exec'd by the shell at once (a Python that could
    # not even start is never looked for), with the environment it would have had.
    wrapper = unpacked_layer(layer_zip, tmp_path)
    done = run_wrapper(wrapper, ["/bin/sh", "-c", 'printf %s "$KEPT"'],
                       {"PATH": "/usr/bin:/bin", "KEPT": "{{resolve:ssm:/a}} ${ssm:/b}",
                        "PARAMETERS_SECRETS_EXTENSION_PYTHON": "/nonexistent/python"}, tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"{{resolve:ssm:/a}} ${ssm:/b}", b"")


# ------------------------------------------------------------------ in process: parsing


def references(value):
    return [(start, end, ref.kind, ref.ident, ref.query, ref.json_key, ref.text)
            for start, end, ref in extension.find_references(value)]


def test_references_are_found_with_the_text_around_them():
    first, second = "{{ssm:/x/y?withDecryption=true&version=3}}", "{{secret:prod/db?jsonKey=pass%26word}}"
    value = f"a{first}b{second}c"
    assert references(value) == [
        (1, 1 + len(first), "ssm", "/x/y", (("withDecryption", "true"), ("version", "3")), None, first),
        (2 + len(first), 2 + len(first) + len(second), "secret", "prod/db", (), "pass&word", second),
    ]
    assert substitute_all(value, {first: "1", second: "2"}) == "a1b2c"
    assert references("{{{ssm:a}}}") == [(1, 10, "ssm", "a", (), None, "{{ssm:a}}")]
    arn = "{{secret:arn:aws:secretsmanager:us-east-1:1:secret:db-AbCdEf?versionId=v1}}"
    assert references("arn " + arn) == [
        (4, 4 + len(arn), "secret", "arn:aws:secretsmanager:us-east-1:1:secret:db-AbCdEf", (("versionId", "v1"),),
         None, arn)]


def substitute_all(value, by_text):
    found = extension.find_references(value)
    return extension.substitute(value, found, {ref: by_text[ref.text] for _, _, ref in found})


@pytest.mark.parametrize("value", [
    "", "plain", "{{resolve:ssm:/x}}", "${ssm:/x}", "{{SSM:/x}}", "{{ ssm:/x}}", "{{ssm/x}}", "{{secrets:x}}", "{{",
])
def test_other_syntaxes_are_not_references(value):
    assert extension.find_references(value) == []


@pytest.mark.parametrize("value,error_type,reference", [
    ("a{{ssm:/x", "MalformedReference", "{{ssm:/x"),
    ("{{ssm:}}", "MalformedReference", "{{ssm:}}"),
    ("{{secret:?versionStage=x}}", "MalformedReference", "{{secret:?versionStage=x}}"),
    ("{{ssm:a b}}", "MalformedReference", "{{ssm:a b}}"),
    ("{{ssm:a{{ssm:b}}", "MalformedReference", "{{ssm:a{{ssm:b}}"),
    ("{{ssm:/x?refreshNow=true}}", "UnknownQueryKey", "{{ssm:/x?refreshNow=true}}"),
    ("{{secret:x?withDecryption=true}}", "UnknownQueryKey", "{{secret:x?withDecryption=true}}"),
    ("{{ssm:/x?version=1&version=2}}", "RepeatedQueryKey", "{{ssm:/x?version=1&version=2}}"),
    ("{{ssm:/x?version=one}}", "InvalidQueryValue", "{{ssm:/x?version=one}}"),
    ("{{ssm:/x?withDecryption=yes}}", "InvalidQueryValue", "{{ssm:/x?withDecryption=yes}}"),
    ("{{ssm:/x?jsonKey=}}", "InvalidQueryValue", "{{ssm:/x?jsonKey=}}"),
    ("{{ssm:/x?jsonKey=%zz}}", "MalformedQuery", "{{ssm:/x?jsonKey=%zz}}"),
    ("ok {{ssm:/a}} then {{secret:}}", "MalformedReference", "{{secret:}}"),
])
def test_malformed_references_are_errors(value, error_type, reference):
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.find_references(value)
    assert caught.value.error_type == error_type
    assert caught.value.reference == reference


def test_an_unterminated_reference_is_shown_cut():
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.find_references("{{ssm:" + "x" * 500)
    assert caught.value.reference == "{{ssm:" + "x" * 58


def parsed(text):
    return extension.find_references(text)[0][2]


def test_the_request_sent_is_the_http_apis_with_jsonkey_last():
    # The extension applies jsonKey (docs/http-api.md): the AWS call is made once per name.
    assert extension.reference_target(parsed("{{ssm:/a?withDecryption=true&jsonKey=k&label=x+y}}")) == \
        "/systemsmanager/parameters/get?name=%2Fa&withDecryption=true&label=x%2By&jsonKey=k"
    assert extension.reference_target(parsed("{{secret:prod/db+1@x?versionStage=AWSPENDING}}")) == \
        "/secretsmanager/get?secretId=prod%2Fdb%2B1%40x&versionStage=AWSPENDING"


@pytest.mark.parametrize("value, expected", [
    ("text", "text"), (5432, "5432"), (None, "null"), (True, "true"), ({"a": [1, "b"]}, '{"a": [1, "b"]}'),
    ("\u00e9", "\u00e9"),
])
def test_a_jsonkey_answer_gives_its_value_as_text(value, expected):
    # What the extension answers to jsonKey without format=raw: {"Value": ..., "ResultMetadata": {}}.
    answer = json.dumps({"Value": value, "ResultMetadata": {}}).encode()
    assert extension.value_from_answer(parsed("{{secret:s?jsonKey=k}}"), answer) == expected


def test_a_jsonkey_answer_without_a_value_is_invalid():
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.value_from_answer(parsed("{{ssm:/p?jsonKey=k}}"), b'{"ResultMetadata": {}}')
    assert caught.value.error_type == "UpstreamInvalidResponse"


def test_the_value_comes_from_the_official_answer_and_binary_is_refused():
    ssm_answer = json.dumps({"Parameter": {"Name": "/p", "Value": "v1", "Version": 1}}).encode()
    assert extension.value_from_answer(parsed("{{ssm:/p}}"), ssm_answer) == "v1"
    secret_answer = json.dumps({"Name": "s", "SecretString": "v2", "SecretBinary": None}).encode()
    assert extension.value_from_answer(parsed("{{secret:s}}"), secret_answer) == "v2"
    binary = json.dumps({"Name": "s", "SecretString": None, "SecretBinary": "AAEC"}).encode()
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.value_from_answer(parsed("{{secret:s}}"), binary)
    assert caught.value.error_type == "BinarySecret"
    assert "AAEC" not in str(caught.value)
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.value_from_answer(parsed("{{ssm:/p}}"), b'{"Parameter": {}}')
    assert caught.value.error_type == "UpstreamInvalidResponse"


# ------------------------------------------------------------------ in process: resolving


class Fetcher:
    """fetch(references) for resolve_environment: answers from a table, records calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, refs):
        keys = list(dict.fromkeys(ref.fetch_key for ref in refs))
        self.calls.append(keys)
        # As the extension answers: with jsonKey, that key's value.
        return {key: self.table[key[:2]] if key[3] is None else json.loads(self.table[key[:2]])[key[3]]
                for key in keys}


def test_resolve_replaces_only_references_and_fetches_each_once():
    fetch = Fetcher({("ssm", "/h"): "host", ("secret", "db"): '{"u": "app", "p": "pw"}'})
    environ = {"URL": "x://{{secret:db?jsonKey=u}}:{{secret:db?jsonKey=p}}@{{ssm:/h}}/{{ssm:/h}}",
               "PLAIN": "p", "BRACES": "{{resolve:ssm:/h}}", "SURROGATE": "\udcff{{ssm:/h}}\udcfe"}
    assert extension.resolve_environment(environ, fetch) == {
        "URL": "x://app:pw@host/host", "SURROGATE": "\udcffhost\udcfe"}
    # Variables in name order; one fetch per name and jsonKey.
    assert fetch.calls == [[("ssm", "/h", (), None), ("secret", "db", (), "u"), ("secret", "db", (), "p")]]


def test_resolve_without_references_fetches_nothing():
    fetch = Fetcher({})
    assert extension.resolve_environment({"A": "1", "B": "{{ x }}"}, fetch) == {}
    assert fetch.calls == []


def test_the_first_failure_in_name_order_names_variable_and_reference():
    fetch = Fetcher({("ssm", "/ok"): "fine", ("ssm", "/gone"): extension.UnresolvedReference("ParameterNotFound"),
                     ("secret", "bin"): extension.UnresolvedReference("BinarySecret", "binary")})
    environ = {"Z": "{{secret:bin}}", "B": "{{ssm:/ok}}{{ssm:/gone?withDecryption=true}}", "A": "{{ssm:/ok}}"}
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.resolve_environment(environ, fetch)
    assert (caught.value.variable, caught.value.reference, caught.value.error_type) == (
        "B", "{{ssm:/gone?withDecryption=true}}", "ParameterNotFound")


@pytest.mark.parametrize("value,error_type", [("a\x00b", "ValueNotText"), ("\ud800", "ValueNotText")])
def test_a_value_an_environment_cannot_hold_is_refused(value, error_type):
    fetch = Fetcher({("ssm", "/p"): value})
    with pytest.raises(extension.UnresolvedReference) as caught:
        extension.resolve_environment({"V": "{{ssm:/p}}"}, fetch)
    assert caught.value.error_type == error_type


class Exec:
    def __init__(self):
        self.calls = []

    def __call__(self, file, args, env):
        self.calls.append((file, list(args), dict(env)))


def test_exec_with_values_execs_the_command_with_the_environment(monkeypatch):
    monkeypatch.setattr(extension, "fetch_references",
                        lambda refs, config: {ref.fetch_key: "resolved" for ref in refs})
    execvpe = Exec()
    environ = {"AWS_SESSION_TOKEN": "token", "A": "{{ssm:/a}}!", "RAW": "caf\udce9"}
    assert extension.exec_with_values(["/var/runtime/bootstrap", "--x"], environ, execvpe) == 0
    assert execvpe.calls == [("/var/runtime/bootstrap", ["/var/runtime/bootstrap", "--x"],
                              {b"AWS_SESSION_TOKEN": b"token", b"A": b"resolved!", b"RAW": b"caf\xe9"})]


def test_exec_with_values_failure_is_one_line_and_no_exec(monkeypatch, capsys):
    monkeypatch.setattr(extension, "fetch_references", lambda refs, config: {
        ref.fetch_key: extension.UnresolvedReference("AccessDeniedException", "not allowed") for ref in refs})
    execvpe = Exec()
    environ = {"AWS_SESSION_TOKEN": "token", "K": "{{secret:k?versionStage=AWSCURRENT}}"}
    assert extension.exec_with_values(["/bin/true"], environ, execvpe) == 1
    assert execvpe.calls == []
    assert capsys.readouterr().err.splitlines() == [
        f"[{NAME}] ERROR environment variable K: {{{{secret:k?versionStage=AWSCURRENT}}}}: "
        "AccessDeniedException: not allowed; the runtime is not started"]


def test_exec_with_values_without_a_token_says_so(capsys):
    execvpe = Exec()
    assert extension.exec_with_values(["/bin/true"], {"K": "{{ssm:/k}}"}, execvpe) == 1
    assert "K: {{ssm:/k}}: NoToken" in capsys.readouterr().err
    assert execvpe.calls == []


def test_exec_with_values_json_log_format(capsys):
    environ = {"AWS_LAMBDA_LOG_FORMAT": "JSON", "K": "{{ssm:}}"}
    assert extension.exec_with_values(["/bin/true"], environ, Exec()) == 1
    record = json.loads(capsys.readouterr().err)
    assert record["level"] == "ERROR"
    assert record["message"].startswith("environment variable K: {{ssm:}}: MalformedReference")


def test_exec_with_values_reports_a_command_that_cannot_start(capsys):
    def execvpe(file, args, env):
        raise FileNotFoundError(2, "No such file or directory")

    assert extension.exec_with_values(["/no/such/runtime"], {}, execvpe) == 127
    assert capsys.readouterr().err.splitlines() == [
        f"[{NAME}] ERROR cannot start /no/such/runtime: No such file or directory"]


def test_main_dispatches_the_wrapper_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(extension, "exec_with_values", lambda command, environ: seen.append(command) or 7)
    assert extension.main(["extension.py", "--exec-with-values", "/bin/runtime", "arg"]) == 7
    assert seen == [["/bin/runtime", "arg"]]


# ------------------------------------------------------------------ in process: the local client


def config_for(port, **overrides):
    environ = {"AWS_TOKEN": "local-token", "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port)}
    environ.update(overrides)
    return extension.load_config(environ)[0]


class OneAnswerServer:
    """Listens on port only when start() is called; answers each request with one canned
    answer, recording the request lines and the token header."""

    def __init__(self, port, status, body):
        self.port = port
        self.answer = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.requests = []
        self.sock = None

    def start(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.requests.append(head.decode("latin-1"))
                connection.sendall(self.answer)

    def close(self):
        if self.sock is not None:
            self.sock.close()


def test_the_client_waits_for_an_extension_that_is_still_starting():
    port = free_port()
    server = OneAnswerServer(port, 200, json.dumps({"Value": "v", "ResultMetadata": {}}).encode())
    now = [0.0]

    def sleep(seconds):  # the extension starts listening during the first wait
        if server.sock is None:
            server.start()
        now[0] += seconds

    try:
        client = extension.LocalClient(config_for(port), clock=lambda: now[0], sleep=sleep)
        assert client.value(parsed("{{ssm:/p?withDecryption=true&jsonKey=k}}")) == "v"
    finally:
        server.close()
    assert now[0] == extension.CONNECT_RETRY_SECONDS  # one refused attempt, one wait
    request = server.requests[0]
    assert request.startswith("GET /systemsmanager/parameters/get?name=%2Fp&withDecryption=true&jsonKey=k "
                              "HTTP/1.1\r\n")
    assert "\r\nX-Aws-Parameters-Secrets-Token: local-token\r\n" in request


def test_the_client_gives_up_when_nothing_listens_within_the_bound():
    port = free_port()
    now = [0.0]
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    client = extension.LocalClient(config_for(port), clock=lambda: now[0], sleep=sleep)
    with pytest.raises(extension.UnresolvedReference) as caught:
        client.value(parsed("{{ssm:/p}}"))
    assert caught.value.error_type == "ExtensionUnreachable"
    assert str(port) in caught.value.message
    # Retried at a steady pace up to the bound, and not past it.
    assert set(waits) == {extension.CONNECT_RETRY_SECONDS}
    assert extension.EXTENSION_WAIT_SECONDS - 2 * extension.CONNECT_RETRY_SECONDS <= now[0] \
        <= extension.EXTENSION_WAIT_SECONDS


def test_the_clients_error_type_is_the_answers_type():
    port = free_port()
    body = json.dumps({"__type": "ResourceNotFoundException", "message": "Secrets Manager can't find it."}).encode()
    server = OneAnswerServer(port, 400, body)
    server.start()
    try:
        references = [parsed("{{secret:a}}"), parsed("{{secret:b?jsonKey=x}}")]
        results = extension.fetch_references(references, config_for(port))
    finally:
        server.close()
    assert {key: (type(result).__name__, result.error_type) for key, result in results.items()} == {
        ("secret", "a", (), None): ("UnresolvedReference", "ResourceNotFoundException"),
        ("secret", "b", (), "x"): ("UnresolvedReference", "ResourceNotFoundException"),
    }
