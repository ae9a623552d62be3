"""The batch routes: get-multiple, get-by-path and batch-get.

Black-box half: the real extension against moto through a counting proxy
(tests/conftest.py), so each test asserts exactly which AWS calls were made. In-process
half: Service.answer driven without a socket, with a scripted AWS client, for what moto
cannot be made to do (1,001 parameters in a path, wrong shapes, transient faults, a call
held open while another request arrives).

Facts checked here, and where they are written down (docs/http-api.md, "get-multiple",
"get-by-path", "batch-get"):
- get-multiple: at most 50 names, 10 per GetParameters call, calls for one request made
  concurrently; each name answered from and stored in the entry /get uses for that name,
  selector (name:3 is /get's version=3, name:prod its label=prod) and decryption; unknown
  names in InvalidParameters, never cached; parameters in the order asked.
- get-by-path: GetParametersByPath following NextToken (10 a page), one cache entry per
  (path, recursive, withDecryption), one paged sequence for concurrent identical
  requests, 502 TooManyParameters past 1,000 parameters.
- batch-get: BatchGetSecretValue for the ids not cached, at most 20; each secret in the
  entry /get uses (AWSCURRENT); a failed id is listed in Errors and not cached.
- the query rules of every route (unknown keys named, repeated keys refused, bad values 400).
- moto (5.x, checked with boto3 against ThreadedMotoServer): GetParameters answers a
  name:version or name:label with the plain Name and no Selector, in the order asked;
  InvalidParameters echoes the names as asked; BatchGetSecretValue lists a missing id in
  Errors as ResourceNotFoundException "Secrets Manager can't find the specified secret."
"""

import base64
import json
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

import extension
from conftest import SM_GET, SSM_GET, UNIT_TOKEN, FakeClock, RecordingLog, stand_in, unit_service

GET = "/systemsmanager/parameters/get"
MULTIPLE = "/systemsmanager/parameters/get-multiple"
BY_PATH = "/systemsmanager/parameters/get-by-path"
BATCH = "/secretsmanager/batch-get"
SECRET_GET = "/secretsmanager/get"
SSM_MANY = "AmazonSSM.GetParameters"
SSM_PATH = "AmazonSSM.GetParametersByPath"
SM_BATCH = "secretsmanager.BatchGetSecretValue"
CACHE = "X-Parameters-Secrets-Cache"
PARAMETER_KEYS = {"ARN", "DataType", "LastModifiedDate", "Name", "Selector", "SourceResult", "Type", "Value",
                  "Version"}
NOT_FOUND_MESSAGE = "Secrets Manager can't find the specified secret."


def query(route, **pairs):
    return route + "?" + "&".join(f"{key}={urllib.parse.quote(str(value), safe='')}" for key, value in pairs.items())


def get(ext, path, status=200):
    got, headers, body = ext.get(path)
    assert got == status, (path, got, body)
    return json.loads(body), headers[CACHE] if status == 200 else None


@pytest.fixture
def world(moto, ssm, secretsmanager, counting_proxy, start_extension):
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url)
    return type("World", (), {"ssm": ssm, "sm": secretsmanager, "proxy": proxy, "ext": ext})


# ------------------------------------------------------------------ get-multiple


def test_25_names_make_3_concurrent_calls_then_none_and_a_get_of_one_is_a_hit(world):
    names = [f"/m/p{index:02d}" for index in range(25)]
    for index, name in enumerate(names):
        world.ssm.put_parameter(Name=name, Value=f"value-{index}", Type="String")
    path = query(MULTIPLE, names=",".join(names))

    body, cache = get(world.ext, path)
    assert cache == "miss"
    assert [p["Value"] for p in body["Parameters"]] == [f"value-{index}" for index in range(25)]
    assert (body["InvalidParameters"], body["ResultMetadata"]) == ([], {})
    assert set(body) == {"Parameters", "InvalidParameters", "ResultMetadata"}
    assert all(set(p) == PARAMETER_KEYS for p in body["Parameters"])
    assert world.proxy.count(SSM_MANY) == 3
    sent = sorted((b["Names"], b["WithDecryption"]) for b in world.proxy.bodies(SSM_MANY))
    assert sent == [(names[0:10], False), (names[10:20], False), (names[20:25], False)]

    again, cache = get(world.ext, path)
    assert (again, cache) == (body, "hit")
    assert world.proxy.count() == 3

    single, cache = get(world.ext, query(GET, name="/m/p07"))
    assert cache == "hit"
    assert single == {"Parameter": body["Parameters"][7], "ResultMetadata": {}}
    assert world.proxy.count() == 3
    assert "value-" not in world.ext.logs()  # a debug-level run logs names, never values


def test_a_get_first_then_get_multiple_asks_aws_only_for_the_others(world):
    for name in ("/r/a", "/r/b", "/r/c"):
        world.ssm.put_parameter(Name=name, Value=name + "-value", Type="String")
    single, cache = get(world.ext, query(GET, name="/r/b"))
    assert cache == "miss"
    body, cache = get(world.ext, query(MULTIPLE, names="/r/a,/r/b,/r/c"))
    assert cache == "miss"
    assert world.proxy.bodies(SSM_MANY) == [{"Names": ["/r/a", "/r/c"], "WithDecryption": False}]
    assert body["Parameters"][1] == single["Parameter"]
    assert [p["Name"] for p in body["Parameters"]] == ["/r/a", "/r/b", "/r/c"]
    assert get(world.ext, query(MULTIPLE, names="/r/c,/r/b"))[1] == "hit"
    assert (world.proxy.count(SSM_GET), world.proxy.count(SSM_MANY)) == (1, 1)


def test_selectors_share_the_entries_of_version_and_label_and_unknown_names_are_not_cached(world):
    world.ssm.put_parameter(Name="/s", Value="one", Type="String")
    world.ssm.put_parameter(Name="/s", Value="two", Type="String", Overwrite=True)
    world.ssm.label_parameter_version(Name="/s", ParameterVersion=1, Labels=["prod"])
    path = query(MULTIPLE, names="/s:1,/nope,/s:prod,/s,/s:9")

    body, cache = get(world.ext, path)
    assert cache == "miss"
    assert [(p["Value"], p["Version"], p["Selector"]) for p in body["Parameters"]] == [
        ("one", 1, ":1"), ("one", 1, ":prod"), ("two", 2, None)]
    assert body["InvalidParameters"] == ["/nope", "/s:9"]
    # One parameter at most once a call: moto answers /s:prod as "/s" with no Selector,
    # in no particular order, so /s, /s:1 and /s:prod in one call could not be told apart.
    assert sorted(b["Names"] for b in world.proxy.bodies(SSM_MANY)) == [
        ["/s"], ["/s:1", "/nope"], ["/s:9"], ["/s:prod"]]

    for single_path, expected in ((query(GET, name="/s", version=1), body["Parameters"][0]),
                                  (query(GET, name="/s", label="prod"), body["Parameters"][1]),
                                  (query(GET, name="/s"), body["Parameters"][2])):
        assert get(world.ext, single_path) == ({"Parameter": expected, "ResultMetadata": {}}, "hit")
    assert world.proxy.count(SSM_GET) == 0

    world.proxy.reset()
    again, cache = get(world.ext, path)
    assert (again, cache) == (body, "miss")  # AWS was asked again, for the unknown names only
    assert world.proxy.bodies(SSM_MANY) == [{"Names": ["/nope", "/s:9"], "WithDecryption": False}]
    error, _ = get(world.ext, query(GET, name="/nope"), status=400)
    assert error["__type"] == "ParameterNotFound"


def test_decryption_is_part_of_the_shared_entry(world):
    world.ssm.put_parameter(Name="/sec", Value="plain-text", Type="SecureString")
    body, _ = get(world.ext, query(MULTIPLE, names="/sec", withDecryption="true"))
    assert body["Parameters"][0]["Value"] == "plain-text"
    assert get(world.ext, query(GET, name="/sec", withDecryption="true"))[1] == "hit"
    single, cache = get(world.ext, query(GET, name="/sec"))
    assert cache == "miss"
    assert single["Parameter"]["Value"] == "kms:alias/aws/ssm:plain-text"  # moto's ciphertext
    assert world.proxy.bodies(SSM_MANY) == [{"Names": ["/sec"], "WithDecryption": True}]


def test_a_name_asked_twice_is_answered_once(world):
    world.ssm.put_parameter(Name="/d", Value="d", Type="String")
    body, _ = get(world.ext, query(MULTIPLE, names="/d,/d"))
    assert [p["Name"] for p in body["Parameters"]] == ["/d"]
    assert world.proxy.bodies(SSM_MANY) == [{"Names": ["/d"], "WithDecryption": False}]


# ------------------------------------------------------------------ get-by-path


def test_64_concurrent_identical_requests_make_one_paged_sequence(world):
    for index in range(23):
        name = f"/tree/p{index:02d}" if index < 15 else f"/tree/sub/p{index:02d}"
        world.ssm.put_parameter(Name=name, Value=f"v{index}", Type="String")
    world.ssm.put_parameter(Name="/treehouse", Value="not under /tree/", Type="String")
    path = query(BY_PATH, path="/tree/", recursive="true")

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: world.ext.get(path, timeout=30), range(64)))
    assert [status for status, _, _ in answers] == [200] * 64
    assert len({body for _, _, body in answers}) == 1
    # Those that waited for the sequence share its status; any that came after it ended hit.
    assert {headers[CACHE] for _, headers, _ in answers} <= {"miss", "hit"}
    sent = world.proxy.bodies(SSM_PATH)
    assert len(sent) == 3  # 23 parameters, 10 a page: one sequence of three calls
    assert [body.get("NextToken") is None for body in sent] == [True, False, False]
    assert all((b["Path"], b["Recursive"], b["WithDecryption"], b["MaxResults"]) == ("/tree/", True, False, 10)
               for b in sent)

    body = json.loads(answers[0][2])
    assert set(body) == {"Parameters", "NextToken", "ResultMetadata"}
    assert (body["NextToken"], body["ResultMetadata"]) == (None, {})
    assert sorted(p["Name"] for p in body["Parameters"]) == sorted(
        [f"/tree/p{i:02d}" for i in range(15)] + [f"/tree/sub/p{i:02d}" for i in range(15, 23)])
    assert all(set(p) == PARAMETER_KEYS for p in body["Parameters"])
    assert get(world.ext, path)[1] == "hit"
    assert world.proxy.count() == 3


def test_recursive_and_decryption_are_separate_entries(world):
    world.ssm.put_parameter(Name="/flat/a", Value="a", Type="String")
    world.ssm.put_parameter(Name="/flat/deep/b", Value="b", Type="SecureString")
    direct, cache = get(world.ext, query(BY_PATH, path="/flat"))
    assert cache == "miss"
    assert [p["Name"] for p in direct["Parameters"]] == ["/flat/a"]
    deep, cache = get(world.ext, query(BY_PATH, path="/flat", recursive="true", withDecryption="true"))
    assert cache == "miss"
    assert sorted((p["Name"], p["Value"]) for p in deep["Parameters"]) == [("/flat/a", "a"), ("/flat/deep/b", "b")]
    assert get(world.ext, query(BY_PATH, path="/flat"))[1] == "hit"
    assert world.proxy.count(SSM_PATH) == 2


def test_an_empty_path_is_an_empty_list(world):
    assert get(world.ext, query(BY_PATH, path="/nothing/here")) == (
        {"Parameters": [], "NextToken": None, "ResultMetadata": {}}, "miss")


# ------------------------------------------------------------------ batch-get


def test_batch_get_with_a_failing_id(world):
    first = world.sm.create_secret(Name="b/one", SecretString='{"k": "batch-secret-9f"}')
    world.sm.create_secret(Name="b/bin", SecretBinary=b"\x00\x01\xff")
    path = query(BATCH, secretIds="b/one,nope,b/bin")

    body, cache = get(world.ext, path)
    assert cache == "miss"
    assert set(body) == {"SecretValues", "Errors", "ResultMetadata"}
    assert body["Errors"] == [{"SecretId": "nope", "ErrorCode": "ResourceNotFoundException",
                               "Message": NOT_FOUND_MESSAGE}]
    assert [(s["Name"], s["SecretString"], s["SecretBinary"]) for s in body["SecretValues"]] == [
        ("b/one", '{"k": "batch-secret-9f"}', None), ("b/bin", None, base64.b64encode(b"\x00\x01\xff").decode())]
    assert body["SecretValues"][0]["ARN"] == first["ARN"]
    assert world.proxy.bodies(SM_BATCH) == [{"SecretIdList": ["b/one", "nope", "b/bin"]}]

    single, cache = get(world.ext, query(SECRET_GET, secretId="b/one"))
    assert cache == "hit"
    assert single == dict(body["SecretValues"][0], ResultMetadata={})
    assert world.proxy.count(SM_GET) == 0

    world.proxy.reset()
    again, cache = get(world.ext, path)
    assert (again, cache) == (body, "miss")  # the failed id was not cached: asked again, alone
    assert world.proxy.bodies(SM_BATCH) == [{"SecretIdList": ["nope"]}]
    assert "batch-secret-9f" not in world.ext.logs()


def test_a_get_first_then_batch_get_asks_only_for_the_others(world):
    world.sm.create_secret(Name="c/one", SecretString="one")
    world.sm.create_secret(Name="c/two", SecretString="two")
    assert get(world.ext, query(SECRET_GET, secretId="c/one"))[1] == "miss"
    body, cache = get(world.ext, query(BATCH, secretIds="c/one,c/two"))
    assert cache == "miss"
    assert [s["SecretString"] for s in body["SecretValues"]] == ["one", "two"]
    assert world.proxy.bodies(SM_BATCH) == [{"SecretIdList": ["c/two"]}]
    assert get(world.ext, query(BATCH, secretIds="c/two,c/one"))[1] == "hit"
    assert world.proxy.count() == 2


# ------------------------------------------------------------------ in process


TOKEN = UNIT_TOKEN
HEADERS = [("x-aws-parameters-secrets-token", TOKEN)]


class ScriptedClient:
    """Stands in for ServiceClient: answer(target, payload) gives the wire answer (or
    raises), which the shape function then checks, as the real client does."""

    def __init__(self, answer, clock):
        self.answer = answer
        self.clock = clock
        self.calls = []
        self._lock = threading.Lock()

    def call(self, target, payload, deadline, shape):
        with self._lock:
            self.calls.append((target, payload))
        return shape(self.answer(target, payload))

    def close_idle(self):
        pass


def wire(name, value="v", version=1):
    return {"Name": name, "Type": "String", "Value": value, "Version": version, "LastModifiedDate": 1668586960.362,
            "ARN": "arn:aws:ssm:us-east-1:123456789012:parameter" + name, "DataType": "text"}


def get_parameters(target, payload):
    """GetParameters as AWS answers it: every name whose text starts with /bad is unknown."""
    names = payload["Names"]
    return {"Parameters": [wire(n, "value of " + n) for n in names if not n.startswith("/bad")],
            "InvalidParameters": [n for n in names if n.startswith("/bad")]}


def make_service(ssm=None, secrets=None, env=None):
    """(service, clock, wall) with scripted GetParameters / BatchGetSecretValue answers."""
    service, clock, wall, _ = unit_service(env)
    service.clients["ssm"] = ScriptedClient(ssm or get_parameters, clock)
    service.clients["secretsmanager"] = ScriptedClient(secrets or (lambda target, payload: {}), clock)
    return service, clock, wall


def answer(service, target):
    status, headers, body = service.answer("GET", target, HEADERS)
    return status, dict(headers), json.loads(body)


def test_the_calls_of_one_request_are_made_at_the_same_time():
    barrier = threading.Barrier(3, timeout=5)

    def concurrent(target, payload):
        barrier.wait()  # breaks (and the test fails) unless all three calls are in flight at once
        return get_parameters(target, payload)

    service, _, _ = make_service(concurrent)
    status, headers, body = answer(service, MULTIPLE + "?names=" + ",".join(f"/n{i}" for i in range(25)))
    assert (status, headers[CACHE], len(body["Parameters"])) == (200, "miss", 25)
    assert len(service.clients["ssm"].calls) == 3


def test_a_get_during_a_get_multiple_waits_for_its_call():
    started, release = threading.Event(), threading.Event()

    def held(target, payload):
        started.set()
        assert release.wait(5)
        return get_parameters(target, payload)

    service, _, _ = make_service(held)
    results = {}
    batch = threading.Thread(target=lambda: results.setdefault("batch", answer(service, MULTIPLE + "?names=/x,/y")))
    batch.start()
    assert started.wait(5)
    single = threading.Thread(target=lambda: results.setdefault("single", answer(service, GET + "?name=/y")))
    single.start()
    single.join(0.2)
    assert single.is_alive()  # waiting for the batch's flight, not calling AWS
    release.set()
    batch.join(5)
    single.join(5)
    assert results["single"][0:2] == (200, {CACHE: "miss"})
    assert results["single"][2]["Parameter"]["Value"] == "value of /y"
    assert [target for target, _ in service.clients["ssm"].calls] == [SSM_MANY]


def test_refresh_now_makes_one_call_a_second_per_name():
    service, clock, _ = make_service()
    path = MULTIPLE + "?names=/a,/b&refreshNow=true"
    assert answer(service, path)[1][CACHE] == "miss"
    assert answer(service, path)[1][CACHE] == "hit"  # within the second: the refresh's result
    assert len(service.clients["ssm"].calls) == 1
    clock.now += 1.0
    assert answer(service, path)[1][CACHE] == "miss"
    assert len(service.clients["ssm"].calls) == 2


def test_stale_values_answer_a_transient_fault_and_a_name_without_one_fails_the_request():
    outcomes = [get_parameters]

    def flaky(target, payload):
        return outcomes[0](target, payload)

    service, clock, wall = make_service(flaky)
    answer(service, MULTIPLE + "?names=/a,/b")
    clock.now += 301
    wall.now += 301

    def down(target, payload):
        raise extension.UpstreamUnreachable("down")

    outcomes[0] = down
    status, headers, body = answer(service, MULTIPLE + "?names=/a,/b")
    assert (status, headers[CACHE], [p["Value"] for p in body["Parameters"]]) == (
        200, "stale", ["value of /a", "value of /b"])
    status, _, body = answer(service, MULTIPLE + "?names=/a,/c")
    assert (status, body["__type"]) == (502, "UpstreamUnreachable")


def test_a_batch_action_iam_denies_is_read_one_call_per_name_from_then_on():
    """The official extension's policy allows ssm:GetParameter only: get-multiple still
    answers, one GetParameter call per name; one INFO line says which permission would
    save calls; later batches go straight to single calls."""
    def narrow(target, payload):
        if target == SSM_MANY:
            raise extension.AwsError(400, "AccessDeniedException", "not allowed: ssm:GetParameters")
        name = payload["Name"]
        if name.startswith("/bad"):
            raise extension.AwsError(400, "ParameterNotFound", "")
        return {"Parameter": wire(name, "value of " + name)}

    service, _, _ = make_service(narrow)
    log = service.log
    status, headers, body = answer(service, MULTIPLE + "?names=/a,/bad,/b")
    assert (status, headers[CACHE]) == (200, "miss")
    assert [p["Value"] for p in body["Parameters"]] == ["value of /a", "value of /b"]
    assert body["InvalidParameters"] == ["/bad"]
    calls = [target for target, _ in service.clients["ssm"].calls]
    assert calls == [SSM_MANY, SSM_GET, SSM_GET, SSM_GET]
    told = [message for level, message in log.lines if level == "info"]
    assert told == ["AmazonSSM.GetParameters is denied (AccessDeniedException): ssm batches are read one call per "
                    "item from now on; allowing ssm:GetParameters in IAM would save calls"]
    # Remembered: no GetParameters call any more, no second INFO line.
    status, _, body = answer(service, MULTIPLE + "?names=/c,/d")
    assert status == 200
    assert [target for target, _ in service.clients["ssm"].calls][4:] == [SSM_GET, SSM_GET]
    assert len([1 for level, _ in log.lines if level == "info"]) == 1


def test_another_error_of_a_batch_call_fails_the_request_with_aws_type():
    def refused(target, payload):
        raise extension.AwsError(400, "ValidationException", "bad names")

    service, _, _ = make_service(refused)
    status, _, body = answer(service, MULTIPLE + "?names=/a")
    assert (status, body) == (400, {"__type": "ValidationException", "message": "bad names"})
    assert len(service.clients["ssm"].calls) == 1


class PagingClient(ScriptedClient):
    """A path whose pages never end, each taking a second of the fake clock; a call made
    at or past its deadline is an UpstreamTimeout, as ServiceClient.call's is."""

    def __init__(self, clock):
        super().__init__(None, clock)
        self.deadlines = []

    def call(self, target, payload, deadline, shape):
        self.deadlines.append(deadline)
        if deadline is not None and self.clock.now >= deadline:
            raise extension.UpstreamTimeout("ssm budget spent")
        self.clock.now += 1.0
        page = len(self.deadlines)
        return shape({"Parameters": [wire(f"/slow/p{page:04d}")], "NextToken": str(page)})


def test_a_paged_sequence_without_a_budget_ends_30_s_after_its_first_call():
    service, clock, _ = make_service()
    service.clients["ssm"] = client = PagingClient(clock)
    started = clock.now
    status, _, body = answer(service, BY_PATH + "?path=/slow")
    assert (status, body["__type"]) == (504, "UpstreamTimeout")
    # One deadline for the whole sequence, 30 s after its first call: 30 pages of a second.
    assert set(client.deadlines) == {started + extension.PAGES_WITHOUT_BUDGET}
    assert clock.now == started + extension.PAGES_WITHOUT_BUDGET
    assert len(client.deadlines) == 31


def test_a_paged_sequence_cut_by_its_limit_answers_the_stale_value():
    service, clock, wall = make_service(lambda target, payload: {"Parameters": [wire("/slow/p")]})
    assert answer(service, BY_PATH + "?path=/slow")[0] == 200
    clock.now += 301
    wall.now += 301
    service.clients["ssm"] = PagingClient(clock)
    status, headers, body = answer(service, BY_PATH + "?path=/slow")
    assert (status, headers[CACHE], [p["Name"] for p in body["Parameters"]]) == (200, "stale", ["/slow/p"])


def test_a_path_of_1000_parameters_is_answered_and_1001_is_502():
    def pages_of(total):
        def by_path(target, payload):
            start = int(payload.get("NextToken") or 0)
            count = min(10, total - start)
            return {"Parameters": [wire(f"/big/p{start + i:04d}") for i in range(count)],
                    "NextToken": str(start + count) if start + count < total else None}
        return by_path

    service, _, _ = make_service(pages_of(1000))
    status, _, body = answer(service, BY_PATH + "?path=/big")
    assert (status, len(body["Parameters"]), body["Parameters"][-1]["Name"]) == (200, 1000, "/big/p0999")
    assert len(service.clients["ssm"].calls) == 100

    service, _, _ = make_service(pages_of(1001))
    for calls in (101, 202):  # not cached: the next request reads the path again
        status, _, body = answer(service, BY_PATH + "?path=/big")
        assert (status, body["__type"]) == (502, "TooManyParameters")
        assert "more than 1000 parameters" in body["message"]
        assert len(service.clients["ssm"].calls) == calls


@pytest.mark.parametrize("page", [
    {"Parameters": [wire("/other/p")]},                  # not under the path
    {"Parameters": [wire("/app/deep/p")]},               # under it, but not directly
    {"Parameters": [wire("/app/p")], "NextToken": 5},     # a NextToken that is not text
    {"Parameters": {"Name": "/app/p"}},                  # not a list
    {"Parameters": [dict(wire("/app/p"), Value=None)]},   # a parameter of the wrong shape
])
def test_a_path_page_of_the_wrong_shape_is_502(page):
    service, _, _ = make_service(lambda target, payload: page)
    status, _, body = answer(service, BY_PATH + "?path=/app")
    assert (status, body["__type"]) == (502, "UpstreamInvalidResponse")


@pytest.mark.parametrize("wire_answer", [
    {"Parameters": [wire("/a")], "InvalidParameters": []},                       # /b left out
    {"Parameters": [wire("/a"), wire("/b"), wire("/c")], "InvalidParameters": []},  # /c not asked
    {"Parameters": [wire("/a"), wire("/b", version="2")]},                      # wrong shape
    {"Parameters": [wire("/a")], "InvalidParameters": [7]},
    {"Parameters": None, "InvalidParameters": ["/a", "/b"]},
    [],
])
def test_a_get_parameters_answer_of_the_wrong_shape_is_502(wire_answer):
    service, _, _ = make_service(lambda target, payload: wire_answer)
    status, _, body = answer(service, MULTIPLE + "?names=/a,/b")
    assert (status, body["__type"]) == (502, "UpstreamInvalidResponse")


def test_versions_of_one_parameter_go_in_calls_of_their_own_and_are_matched_by_version():
    def versions(target, payload):  # the version a name asks for; the latest (3) without one
        return {"Parameters": [wire(name.split(":")[0], f"value {name.split(':')[1] if ':' in name else 3}",
                                    int(name.split(":")[1]) if ":" in name else 3)
                               for name in payload["Names"]], "InvalidParameters": []}

    service, _, _ = make_service(versions)
    status, _, body = answer(service, MULTIPLE + "?names=/v:1,/w,/v:2,/v")
    assert [(p["Value"], p["Selector"]) for p in body["Parameters"]] == [
        ("value 1", ":1"), ("value 3", None), ("value 2", ":2"), ("value 3", None)]
    assert sorted(payload["Names"] for _, payload in service.clients["ssm"].calls) == [
        ["/v"], ["/v:1", "/w"], ["/v:2"]]


def test_another_version_than_the_one_asked_is_502():
    service, _, _ = make_service(lambda target, payload: {"Parameters": [wire("/v", "one", 1)]})
    status, _, body = answer(service, MULTIPLE + "?names=/v:2")
    assert (status, body["__type"]) == (502, "UpstreamInvalidResponse")


SECRET = {"ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:app/s-AbCdEf", "Name": "app/s",
          "VersionId": "v1", "SecretString": "s3cr3t", "VersionStages": ["AWSCURRENT"], "CreatedDate": 1668586960}


@pytest.mark.parametrize("wire_answer", [
    {"SecretValues": [], "Errors": []},                                                   # app/s left out
    {"SecretValues": [dict(SECRET, Name="other", ARN="arn:other-AbCdEf")], "Errors": []},  # another secret
    {"SecretValues": [SECRET], "Errors": [{"SecretId": "unasked", "ErrorCode": "X", "Message": "m"}]},
    {"SecretValues": [dict(SECRET, SecretString=5)]},
    {"SecretValues": [dict(SECRET, ARN=5)]},
    {"SecretValues": "app/s"},
])
def test_a_batch_get_answer_of_the_wrong_shape_is_502(wire_answer):
    service, _, _ = make_service(secrets=lambda target, payload: wire_answer)
    status, _, body = answer(service, BATCH + "?secretIds=app/s")
    assert (status, body["__type"]) == (502, "UpstreamInvalidResponse")


def test_a_secret_error_entry_is_listed_and_a_single_get_of_it_is_that_error():
    def batch(target, payload):
        return {"SecretValues": [SECRET], "Errors": [
            {"SecretId": "locked", "ErrorCode": "DecryptionFailure", "Message": "KMS refused"}]}

    service, _, _ = make_service(secrets=batch)
    status, headers, body = answer(service, BATCH + "?secretIds=app/s,locked")
    assert (status, headers[CACHE]) == (200, "miss")
    assert body["Errors"] == [{"SecretId": "locked", "ErrorCode": "DecryptionFailure", "Message": "KMS refused"}]
    assert [entry["Name"] for entry in body["SecretValues"]] == ["app/s"]
    assert "ResultMetadata" not in body["SecretValues"][0]
    status, headers, body = answer(service, SECRET_GET + "?secretId=app/s")
    assert (status, headers[CACHE], body["SecretString"]) == (200, "hit", "s3cr3t")


# ------------------------------------------------------------------ the query rules


@pytest.mark.parametrize("target, status, error_type, message", [
    (MULTIPLE + "?names=/a&withdecryption=true", 400, "UnknownQueryKey",
     "unknown query key 'withdecryption'; did you mean 'withDecryption'?"),
    (MULTIPLE + "?names=/a&names=/b", 400, "RepeatedQueryKey", "query key 'names' is given more than once"),
    (MULTIPLE + "?name=/a", 400, "UnknownQueryKey", "unknown query key 'name'; did you mean 'names'?"),
    (MULTIPLE + "?names=/a&jsonKey=k", 400, "UnknownQueryKey",
     "unknown query key 'jsonKey'; known keys: names, withDecryption, refreshNow"),
    (MULTIPLE, 400, "MissingQueryKey", "the query key 'names' (parameter names, comma-separated) is required"),
    (MULTIPLE + "?names=/a,,/b", 400, "InvalidQueryValue", "names holds an empty item"),
    (MULTIPLE + "?names=" + ",".join(f"/n{i}" for i in range(51)), 400, "InvalidQueryValue",
     "names holds 51 items; at most 50 are taken"),
    (MULTIPLE + "?names=/a&withDecryption=yes", 400, "InvalidQueryValue",
     "withDecryption must be true or false (any case)"),
    (MULTIPLE + "?names=/" + "x" * 2048, 400, "InvalidQueryValue",
     "names holds an item longer than 2048 characters"),
    (BY_PATH + "?path=/a&recursive=yes", 400, "InvalidQueryValue", "recursive must be true or false (any case)"),
    (BY_PATH + "?path=/a&Recursive=true", 400, "UnknownQueryKey",
     "unknown query key 'Recursive'; did you mean 'recursive'?"),
    (BY_PATH + "?path=/a&path=/b", 400, "RepeatedQueryKey", "query key 'path' is given more than once"),
    (BY_PATH + "?path=app", 400, "InvalidQueryValue", "path must start with '/'"),
    (BY_PATH + "?recursive=true", 400, "MissingQueryKey", "the query key 'path' (the parameter path) is required"),
    (BY_PATH + "?path=/a&refreshNow=maybe", 400, "InvalidQueryValue",
     "refreshNow must be true or false or 1 or 0 (any case)"),
    (BATCH + "?secretIds=a&secretId=b", 400, "UnknownQueryKey",
     "unknown query key 'secretId'; did you mean 'secretIds'?"),
    (BATCH + "?secretIds=a&secretIds=b", 400, "RepeatedQueryKey", "query key 'secretIds' is given more than once"),
    (BATCH + "?secretIds=" + ",".join(f"s{i}" for i in range(21)), 400, "InvalidQueryValue",
     "secretIds holds 21 items; at most 20 are taken"),
    (BATCH + "?secretIds=a,", 400, "InvalidQueryValue", "secretIds holds an empty item"),
    (BATCH, 400, "MissingQueryKey", "the query key 'secretIds' (secret names or ARNs, comma-separated) is required"),
])
def test_query_rules_on_the_new_routes(target, status, error_type, message):
    service, _, _ = make_service()
    assert answer(service, target) == (status, {}, {"__type": error_type, "message": message})
    assert service.clients["ssm"].calls == service.clients["secretsmanager"].calls == []


@pytest.mark.parametrize("route", [MULTIPLE + "?names=/a", BY_PATH + "?path=/a", BATCH + "?secretIds=a",
                                   MULTIPLE + "/?names=/a", BY_PATH + "/?path=/a", BATCH + "/?secretIds=a"])
def test_the_new_routes_need_the_token(route):
    service, _, _ = make_service()
    status, _, body = service.answer("GET", route, [])
    assert (status, json.loads(body)["__type"]) == (401, "MissingToken")
    status, _, body = service.answer("GET", route, [("x-aws-parameters-secrets-token", "wrong")])
    assert (status, json.loads(body)["__type"]) == (403, "InvalidToken")


def test_the_cache_off_bypasses_every_item():
    service, _, _ = make_service(env={"PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED": "FALSE"})
    for _ in range(2):
        status, headers, body = answer(service, MULTIPLE + "?names=/a,/bad")
        assert (status, headers[CACHE], body["InvalidParameters"]) == (200, "bypass", ["/bad"])
    assert len(service.clients["ssm"].calls) == 2


def test_a_batch_hit_reads_the_cache_once_with_the_single_rules():
    clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
    cache = extension.TTLCache(3, 10, clock, wall)
    cache.put("a", b"A", 5)
    cache.put("b", b"B", 100)
    cache.put("c", b"C", 100)
    clock.now += 6
    assert cache.get_many(["a", "b", "x"]) == {"b": b"B"}  # "a" expired, within its stale window
    assert cache.get_stale("a") == b"A"
    cache.put("d", b"D", 100)  # evicts the least recently used: "a"
    cache.put("e", b"E", 100)  # then "c", not "b": reading "b" made it recently used
    assert cache.get_many(["a", "b", "c", "d", "e"]) == {"b": b"B", "d": b"D", "e": b"E"}
    assert cache.get_stale("a") is None
    wall.now += 101  # the wall clock alone ends them
    assert cache.get_many(["b", "d", "e"]) == {}


def test_a_batch_answer_of_the_wrong_shape_is_retried_like_any_other():
    config, _ = extension.load_config({"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "k",
                                       "AWS_SECRET_ACCESS_KEY": "s"})
    credentials = extension.CredentialProvider(config, RecordingLog())
    credentials.resolve()
    client = extension.ServiceClient("ssm", "http://127.0.0.1:9", "us-east-1", credentials, 1, extension.Stats(),
                                     RecordingLog(), FakeClock(), lambda seconds: None)
    answers = iter([{"Parameters": [wire("/other")]}, {"Parameters": [wire("/a")], "InvalidParameters": ["/b"]}])
    attempts = []
    stand_in(client, "_attempt", lambda *args: attempts.append(args[-1]) or next(answers))
    asked = [("/a", "/a", None), ("/b", "/b", None)]
    results = client.call(SSM_MANY, {"Names": ["/a", "/b"]}, None,
                          lambda answer: extension.split_parameters(answer, asked))
    assert attempts == [3, 2]
    assert json.loads(results["/a"])["Parameter"]["Name"] == "/a"
    assert (type(results["/b"]), results["/b"].error_type) == (extension.ItemError, "ParameterNotFound")


def test_a_token_pasted_as_a_name_is_never_sent_nor_comes_back():
    calls = []
    service, _, _ = make_service(secrets=lambda target, payload: calls.append(target))
    for target in (MULTIPLE + "?names=/a,/bad" + TOKEN, BATCH + "?secretIds=" + TOKEN):
        status, _, body = service.answer("GET", target, HEADERS)
        assert (status, json.loads(body)["__type"]) == (400, "TokenInQuery")
        assert TOKEN.encode() not in body
    assert calls == []
