"""jsonKey and format=raw on /systemsmanager/parameters/get and /secretsmanager/get,
against moto through a counting proxy, plus the answer bytes in process.

Facts checked here, and where they are written down (docs/http-api.md, "jsonKey and
format=raw"):
- jsonKey=k: the value (SecretString, or a parameter's Value) must be a JSON object;
  the answer is {"Value": <k's value>, "ResultMetadata": {}}; a missing key is 404
  JsonKeyNotFound naming the key, a value that is not a JSON object 400
  ValueNotJsonObject; neither body holds the value.
- format=raw: the value alone, text/plain; charset=utf-8; a binary secret's bytes as
  application/octet-stream; with jsonKey, a string as its text and anything else as JSON
  text; the cache header as on any answer.
- the cache holds the whole value once: every projection of one value is one AWS call.
"""

import json
import urllib.parse

import pytest

import extension
from conftest import SM_GET, SSM_GET

GET = "/systemsmanager/parameters/get"
SECRET_GET = "/secretsmanager/get"
CACHE = "X-Parameters-Secrets-Cache"
TEXT = "text/plain; charset=utf-8"
DOCUMENT = {"password": "pw-\u00e9t\u00e9 \u2713", "port": 5432, "nested": {"a": [1, "b"]}, "nothing": None,
            "flag": True}
BINARY = b"\x00\x01\xfe\xffbinary"


def query(route, **pairs):
    return route + "?" + "&".join(f"{key}={urllib.parse.quote(str(value), safe='')}" for key, value in pairs.items())


@pytest.fixture
def world(moto, ssm, secretsmanager, counting_proxy, start_extension):
    secretsmanager.create_secret(Name="db", SecretString=json.dumps(DOCUMENT))
    secretsmanager.create_secret(Name="bin", SecretBinary=BINARY)
    secretsmanager.create_secret(Name="plain", SecretString="not json at all")
    secretsmanager.create_secret(Name="array", SecretString="[1, 2]")
    ssm.put_parameter(Name="/cfg", Value='{"url": "postgres://x", "pool": 5}', Type="String")
    ssm.put_parameter(Name="/list", Value="a,b,c", Type="StringList")
    ssm.put_parameter(Name="/sec", Value="s\u00e9cret", Type="SecureString")
    proxy = counting_proxy(moto)
    return type("World", (), {"ext": start_extension(proxy.url), "proxy": proxy})


def fetch(world, path):
    status, headers, body = world.ext.get(path)
    return status, headers["Content-Type"], headers.get(CACHE), body


def test_every_projection_of_a_secret_is_one_aws_call(world):
    cases = [
        ({"jsonKey": "password"}, "application/json",
         json.dumps({"Value": DOCUMENT["password"], "ResultMetadata": {}}).encode()),
        ({"jsonKey": "password", "format": "raw"}, TEXT, DOCUMENT["password"].encode("utf-8")),
        ({"jsonKey": "port", "format": "raw"}, TEXT, b"5432"),
        ({"jsonKey": "nested", "format": "raw"}, TEXT, b'{"a": [1, "b"]}'),
        ({"jsonKey": "nothing", "format": "raw"}, TEXT, b"null"),
        ({"jsonKey": "flag"}, "application/json", b'{"Value": true, "ResultMetadata": {}}'),
        ({"format": "raw"}, TEXT, json.dumps(DOCUMENT).encode("utf-8")),
        ({"format": "RAW"}, TEXT, json.dumps(DOCUMENT).encode("utf-8")),
    ]
    for index, (pairs, content_type, body) in enumerate(cases):
        assert fetch(world, query(SECRET_GET, secretId="db", **pairs)) == (
            200, content_type, "miss" if index == 0 else "hit", body), pairs
    status, content_type, cache, body = fetch(world, query(SECRET_GET, secretId="db", format="json"))
    assert (status, content_type, cache, json.loads(body)["SecretString"]) == (
        200, "application/json", "hit", json.dumps(DOCUMENT))
    assert world.proxy.count(SM_GET) == 1


def test_a_binary_secret_raw_is_its_bytes(world):
    assert fetch(world, query(SECRET_GET, secretId="bin", format="raw")) == (
        200, "application/octet-stream", "miss", BINARY)
    status, headers, body = world.ext.get(query(SECRET_GET, secretId="bin", jsonKey="k"))
    assert (status, json.loads(body)) == (400, {"__type": "ValueNotJsonObject",
                                                "message": "the value is not a JSON object, so it has no key 'k'"})


def test_parameters_raw_and_by_key(world):
    assert fetch(world, query(GET, name="/cfg", jsonKey="url")) == (
        200, "application/json", "miss", b'{"Value": "postgres://x", "ResultMetadata": {}}')
    assert fetch(world, query(GET, name="/cfg", jsonKey="pool", format="raw")) == (200, TEXT, "hit", b"5")
    assert fetch(world, query(GET, name="/cfg", format="raw")) == (
        200, TEXT, "hit", b'{"url": "postgres://x", "pool": 5}')
    assert fetch(world, query(GET, name="/list", format="raw")) == (200, TEXT, "miss", b"a,b,c")
    assert fetch(world, query(GET, name="/sec", withDecryption="true", format="raw")) == (
        200, TEXT, "miss", "s\u00e9cret".encode("utf-8"))
    assert world.proxy.count(SSM_GET) == 3


@pytest.mark.parametrize("path, status, error_type, message", [
    (query(SECRET_GET, secretId="db", jsonKey="user"), 404, "JsonKeyNotFound", "the value has no key 'user'"),
    (query(SECRET_GET, secretId="db", jsonKey="user", format="raw"), 404, "JsonKeyNotFound",
     "the value has no key 'user'"),
    (query(SECRET_GET, secretId="plain", jsonKey="password"), 400, "ValueNotJsonObject",
     "the value is not a JSON object, so it has no key 'password'"),
    (query(SECRET_GET, secretId="array", jsonKey="0"), 400, "ValueNotJsonObject",
     "the value is not a JSON object, so it has no key '0'"),
    (query(GET, name="/list", jsonKey="a"), 400, "ValueNotJsonObject",
     "the value is not a JSON object, so it has no key 'a'"),
    (query(GET, name="/cfg", jsonKey="URL"), 404, "JsonKeyNotFound", "the value has no key 'URL'"),
])
def test_projection_errors_name_the_key_and_never_the_value(world, path, status, error_type, message):
    got, headers, body = world.ext.get(path)
    assert (got, headers["Content-Type"], json.loads(body)) == (
        status, "application/json", {"__type": error_type, "message": message})
    for value in ("pw-", "not json", "postgres", "a,b,c"):
        assert value.encode() not in body
        assert value not in world.ext.logs()  # the debug line of the failure names the key only


def test_an_aws_error_with_format_raw_is_still_a_json_error(world):
    status, headers, body = world.ext.get(query(GET, name="/missing", format="raw"))
    assert (status, headers["Content-Type"], json.loads(body)["__type"]) == (
        400, "application/json", "ParameterNotFound")


def test_the_cached_value_is_whole_after_a_projection(world):
    fetch(world, query(SECRET_GET, secretId="db", jsonKey="port"))
    status, _, cache, body = fetch(world, query(SECRET_GET, secretId="db"))
    assert (status, cache, json.loads(json.loads(body)["SecretString"])) == (200, "hit", DOCUMENT)


# ------------------------------------------------------------------ in process


@pytest.mark.parametrize("target, message", [
    ("?secretId=s&format=xml", "format must be raw or json (any case)"),
    ("?secretId=s&jsonKey=", "jsonKey must be 1 to 2048 characters"),
    ("?secretId=s&jsonKey=" + "k" * 2049, "jsonKey must be 1 to 2048 characters"),
])
def test_bad_projection_values_are_400(target, message):
    values = extension.single_values(extension.parse_query(target[1:]), extension.SECRET_KEYS)
    with pytest.raises(extension.ClientError) as caught:
        extension._projection(values)
    assert (caught.value.status, caught.value.error_type, caught.value.message) == (400, "InvalidQueryValue", message)


@pytest.mark.parametrize("pairs, error_type", [
    ([("name", "/a"), ("jsonkey", "k")], "UnknownQueryKey"),
    ([("name", "/a"), ("format", "raw"), ("format", "raw")], "RepeatedQueryKey"),
    ([("name", "/a"), ("jsonKey", "a"), ("jsonKey", "b")], "RepeatedQueryKey"),
])
def test_query_rules_on_the_new_keys(pairs, error_type):
    with pytest.raises(extension.ClientError) as caught:
        extension.parameter_lookup(pairs)
    assert (caught.value.status, caught.value.error_type) == (400, error_type)


@pytest.mark.parametrize("text", ['{"k": NaN}', '{"k": Infinity}', "[" * 100000, '"k"', "", None])
def test_what_is_not_a_json_object(text):
    with pytest.raises(extension.ClientError) as caught:
        extension.json_member(text, "k")
    assert caught.value.error_type == "ValueNotJsonObject"


def test_a_long_key_is_named_cut_to_100_characters():
    with pytest.raises(extension.ClientError) as caught:
        extension.json_member("{}", "k" * 150)
    assert caught.value.message == f"the value has no key '{'k' * 100}\u2026'"


def test_the_content_type_of_an_answer_is_its_own_when_it_names_one(monkeypatch):
    monkeypatch.setattr(extension, "http_date", lambda: "Sun, 06 Nov 1994 08:49:37 GMT")
    assert extension.format_response(200, (("Content-Type", TEXT), (CACHE, "hit")), b"v") == (
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nX-Parameters-Secrets-Cache: hit\r\n\r\nv")
    assert extension.format_response(200, ((CACHE, "hit"),), b"{}") == (
        b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nX-Parameters-Secrets-Cache: hit\r\n\r\n{}")


def test_a_binary_secret_that_is_not_base64_is_502_when_asked_raw():
    body = json.dumps({"ARN": "a", "CreatedDate": None, "Name": "n", "SecretBinary": "not base64!",
                       "SecretString": None, "VersionId": "v", "VersionStages": None}).encode()
    with pytest.raises(extension.UpstreamInvalidResponse):
        extension.project("secretsmanager", body, None, True, "hit")
