"""Logs and metrics the way Lambda users read them.

* AWS_LAMBDA_LOG_FORMAT=JSON (Lambda's advanced logging): every line the extension
  writes is one JSON object with timestamp, level, message, extension, so CloudWatch
  Logs Insights can filter on it; otherwise text lines ``[<name>] LEVEL message``.
* PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL filters: none < error < warn < info < debug.
* At shutdown (SIGTERM when standalone) one INFO line
  ``summary: hits=N misses=N aws_calls=N errors=N stale=N refreshed_ahead=N``; with
  PARAMETERS_SECRETS_EXTENSION_METRICS=emf also one CloudWatch Embedded Metric Format
  line. EMF rules followed here (CloudWatch "Specification: Embedded metric format"):
  a JSON object whose ``_aws`` member holds ``Timestamp`` (epoch milliseconds, integer)
  and ``CloudWatchMetrics`` (a list of ``{"Namespace", "Dimensions": [[names]],
  "Metrics": [{"Name", "Unit"}]}``); every dimension and metric named there is a
  top-level member of the same object. The line must be bare JSON (a prefix such as
  ``[name] INFO`` would stop CloudWatch from extracting the metrics).
"""

import datetime
import json
import re
import time

import pytest

import extension
from conftest import SM_GET, SSM_GET, free_port, wait_for

DEFAULT_NAME = "parameters-secrets-extension"
VERSION = extension.__version__
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
SUMMARY_RE = re.compile(
    r"summary: hits=(\d+) misses=(\d+) aws_calls=(\d+) errors=(\d+) stale=(\d+) refreshed_ahead=(\d+) "
    rf"version={re.escape(VERSION)}$", re.MULTILINE)
TEXT_RE = re.compile(r"^\[(?P<name>[^\]]+)\] (?P<level>DEBUG|INFO|WARN|ERROR) (?P<msg>.*)$")
EMF_METRICS = {"Hits", "Misses", "AwsCalls", "Errors", "StaleAnswers", "RefreshedAhead"}


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _seed(ssm, secretsmanager):
    ssm.put_parameter(Name="/log/p", Value="plain-value", Type="String")
    ssm.put_parameter(Name="/log/sec", Value="securestring-plaintext-77", Type="SecureString")
    secretsmanager.create_secret(Name="log/s", SecretString="secret-value-for-logging-42")


def _known_sequence(ext):
    """3 hits, 2 misses, 3 AWS calls, 1 AWS error, 0 stale answers."""
    results = [
        ext.get("/systemsmanager/parameters/get?name=%2Flog%2Fp"),       # miss, AWS 1
        ext.get("/systemsmanager/parameters/get?name=%2Flog%2Fp"),       # hit
        ext.get("/systemsmanager/parameters/get?name=%2Flog%2Fp"),       # hit
        ext.get("/secretsmanager/get?secretId=log%2Fs"),                 # miss, AWS 2
        ext.get("/secretsmanager/get?secretId=log%2Fs"),                 # hit
        ext.get("/systemsmanager/parameters/get?name=%2Flog%2Fmissing"),  # AWS 3: error
    ]
    statuses = [status for status, _, _ in results]
    assert statuses[:5] == [200] * 5, results
    assert statuses[5] == 400, results[5]  # ParameterNotFound, AWS's status passed through
    cache = [headers.get("X-Parameters-Secrets-Cache") for _, headers, _ in results[:5]]
    assert cache == ["miss", "hit", "hit", "miss", "hit"]


def _summary(text):
    found = SUMMARY_RE.findall(text)
    assert len(found) == 1, "expected one summary line in:\n" + text
    hits, misses, aws, errors, stale, ahead = map(int, found[0])
    return {"hits": hits, "misses": misses, "aws_calls": aws, "errors": errors,
            "stale": stale, "refreshed_ahead": ahead}


def _emf_lines(text):
    out = []
    for line in _lines(text):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "_aws" in obj:
            out.append(obj)
    return out


def _no_leaks(ext, *values):
    logs = ext.logs()
    for value in (ext.token,) + values:
        assert value not in logs, f"leaked into the logs: {value!r}"


# ----------------------------------------------------------------- JSON format


@pytest.mark.parametrize("fmt", ["JSON", "json"])
def test_json_log_format_every_line_is_one_object(moto, ssm, secretsmanager,
                                                   start_extension, fmt):
    _seed(ssm, secretsmanager)
    ext = start_extension(moto, name="my-json-ext", env={
        "AWS_LAMBDA_LOG_FORMAT": fmt,
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
        # A WARN at start: a TTL above the ceiling is clamped (README.md).
        "SSM_PARAMETER_STORE_TTL": "99999",
    })
    _known_sequence(ext)
    status, _, _ = ext.get("/systemsmanager/parameters/get?name=%2Flog%2Fsec&withDecryption=true")
    assert status == 200
    status, _, _ = ext.get("/systemsmanager/parameters/get?name=x", token="wrong-token")
    assert status == 403
    assert ext.stop() == 0, ext.stderr()

    lines = _lines(ext.stderr()) + _lines(ext.stdout())
    assert len(lines) >= 3
    levels = set()
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert isinstance(obj, dict), line
        if "_aws" in obj:
            continue  # an EMF line is JSON too (not enabled here, see below)
        assert {"timestamp", "level", "message", "extension"} <= set(obj), line
        assert obj["extension"] == "my-json-ext", line
        assert obj["level"] in LEVELS, line
        assert isinstance(obj["message"], str) and obj["message"], line
        # ISO-8601 UTC, as Lambda's own JSON log lines ("2024-01-01T00:00:00.000Z").
        stamp = obj["timestamp"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$", stamp), stamp
        parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs((parsed - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 3600
        assert not obj["message"].startswith("[my-json-ext]"), line
        levels.add(obj["level"])
    assert {"DEBUG", "INFO", "WARN"} <= levels, levels
    objs = [json.loads(line) for line in lines]
    objs = [o for o in objs if "_aws" not in o]
    assert any(o["level"] == "INFO"
               and o["message"].startswith(f"version {VERSION}, listening on 127.0.0.1:{ext.port}")
               for o in objs), objs
    assert any(o["level"] == "WARN" and "SSM_PARAMETER_STORE_TTL" in o["message"]
               for o in objs), objs
    assert any(o["level"] == "INFO" and SUMMARY_RE.search(o["message"]) for o in objs), objs
    _no_leaks(ext, "secret-value-for-logging-42", "securestring-plaintext-77")


def test_json_startup_error_is_json(start_extension_raw):
    """The refusal at start (no region) is a JSON line too, level ERROR."""
    ext = start_extension_raw("http://127.0.0.1:9", env={
        "AWS_LAMBDA_LOG_FORMAT": "JSON", "AWS_REGION": None, "AWS_DEFAULT_REGION": None})
    assert ext.proc.returncode == 2
    objs = [json.loads(line) for line in _lines(ext.stderr())]
    errors = [o for o in objs if o["level"] == "ERROR"]
    assert len(errors) == 1, objs
    assert "AWS_REGION" in errors[0]["message"]
    assert errors[0]["extension"] == DEFAULT_NAME


# ----------------------------------------------------------------- text format


def test_text_log_format(moto, ssm, secretsmanager, start_extension):
    _seed(ssm, secretsmanager)
    ext = start_extension(moto, env={"SSM_PARAMETER_STORE_TTL": "99999"})
    _known_sequence(ext)
    assert ext.stop() == 0, ext.stderr()
    lines = _lines(ext.stderr())
    levels = set()
    for line in lines:
        match = TEXT_RE.match(line)
        assert match, f"not a '[name] LEVEL message' line: {line!r}"
        assert match.group("name") == DEFAULT_NAME
        levels.add(match.group("level"))
    assert {"DEBUG", "INFO", "WARN"} <= levels
    # One start-up line: the version, then every address (::1 where the host has it).
    started = f"[{DEFAULT_NAME}] INFO version {VERSION}, listening on 127.0.0.1:{ext.port}"
    assert [line for line in lines if " listening on " in line] in (
        [started], [f"{started} and [::1]:{ext.port}"]), lines
    assert any(re.match(rf"^\[{DEFAULT_NAME}\] WARN .*SSM_PARAMETER_STORE_TTL", line)
               for line in lines), lines
    _no_leaks(ext, "secret-value-for-logging-42")


def test_text_format_uses_the_given_name(moto, start_extension):
    ext = start_extension(moto, name="custom-name",
                          env={"AWS_LAMBDA_LOG_FORMAT": "Text"})
    assert ext.stop() == 0, ext.stderr()
    lines = _lines(ext.stderr())
    assert lines
    assert all(line.startswith("[custom-name] ") for line in lines), lines


# ------------------------------------------------------------------ log levels

# What each level lets through. DEBUG: "not present, using default" lines
# (docs/configuration.md); INFO: "listening on"; WARN: the clamped TTL.
LEVEL_CASES = {
    "debug": {"DEBUG", "INFO", "WARN"},
    "info": {"INFO", "WARN"},
    "warn": {"WARN"},
    "WARN": {"WARN"},
    "error": set(),
    "none": set(),
}


@pytest.mark.parametrize("level", sorted(LEVEL_CASES))
def test_log_level_filters(moto, ssm, start_extension, level):
    ssm.put_parameter(Name="lvl", Value="v", Type="String")
    ext = start_extension(moto, env={
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": level,
        "SSM_PARAMETER_STORE_TTL": "99999",
    })
    status, _, _ = ext.get("/systemsmanager/parameters/get?name=lvl")
    assert status == 200
    status, _, _ = ext.get("/systemsmanager/parameters/get?name=lvl")
    assert status == 200
    assert ext.stop() == 0, ext.stderr()
    lines = _lines(ext.stderr())
    seen = set()
    for line in lines:
        match = TEXT_RE.match(line)
        assert match, line
        seen.add(match.group("level"))
    expected = LEVEL_CASES[level]
    assert seen == expected, (level, lines)
    if level in ("none", "error"):
        assert lines == []


def test_error_level_still_reports_fatal_errors(start_extension_raw):
    ext = start_extension_raw("http://127.0.0.1:9", env={
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "error", "AWS_REGION": None})
    assert ext.proc.returncode == 2
    lines = _lines(ext.stderr())
    assert len(lines) == 1 and TEXT_RE.match(lines[0]).group("level") == "ERROR", lines


# ------------------------------------------------------------- summary and EMF


def test_summary_line_at_sigterm(moto, ssm, secretsmanager, counting_proxy,
                                 start_extension):
    _seed(ssm, secretsmanager)
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={"PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info"})
    _known_sequence(ext)
    assert proxy.count(SSM_GET) == 2 and proxy.count(SM_GET) == 1
    assert ext.stop() == 0, ext.stderr()
    summary_lines = [line for line in _lines(ext.stderr()) if SUMMARY_RE.search(line)]
    assert len(summary_lines) == 1, ext.stderr()
    assert summary_lines[0].startswith(f"[{DEFAULT_NAME}] INFO summary: "), summary_lines
    got = _summary(ext.stderr())
    # misses: the 2 requests answered "miss", and the one that ended in
    # ParameterNotFound, which missed the cache too.
    assert got["hits"] == 3, got
    assert got["aws_calls"] == 3 == proxy.count(), got
    assert got["errors"] == 1, got
    assert got["stale"] == 0, got
    assert got["misses"] == 3, got
    # No EMF line unless asked for.
    assert _emf_lines(ext.logs()) == []


def test_summary_counts_stale_answers(moto, ssm, counting_proxy, start_extension):
    """TTL 1 s, then AWS becomes unreachable: the next request after expiry is answered
    from the expired entry (stale), and the summary counts exactly that one."""
    ssm.put_parameter(Name="stale-p", Value="v1", Type="String")
    proxy = counting_proxy(moto)
    ext = start_extension(proxy.url, env={
        "SSM_PARAMETER_STORE_TTL": "1",
        "PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS": "300",
        "SSM_PARAMETER_STORE_TIMEOUT_MILLIS": "2000",
    })
    path = "/systemsmanager/parameters/get?name=stale-p"
    status, headers, _ = ext.get(path)
    assert status == 200 and headers["X-Parameters-Secrets-Cache"] == "miss"
    # AWS fails from now on: the proxy's target is a closed port, so it answers 502
    # (a transient server-side failure). Closing the proxy would not do: the extension's
    # keep-alive connection to it would still be served.
    proxy.target_port = free_port()
    answers = []

    def stale_seen():
        status, headers, body = ext.get(path)
        assert status == 200, body
        answers.append(headers["X-Parameters-Secrets-Cache"])
        return answers[-1] == "stale"

    wait_for(stale_seen, timeout=10, interval=0.1, message="a stale answer")
    assert set(answers[:-1]) <= {"hit"}, answers
    assert ext.stop() == 0, ext.stderr()
    got = _summary(ext.stderr())
    assert got["stale"] == 1, got
    assert got["hits"] == len(answers) - 1, got
    # misses: the first request, and the failed refresh that the stale answer followed
    # (one refresh, however many attempts it made: one error).
    assert got["misses"] == 2, got
    assert got["errors"] == 1, got


@pytest.mark.parametrize("fmt", ["Text", "JSON"])
def test_emf_line_at_sigterm(moto, ssm, secretsmanager, start_extension, fmt):
    _seed(ssm, secretsmanager)
    before_ms = int(time.time() * 1000)
    ext = start_extension(moto, name="emf-ext", env={
        "PARAMETERS_SECRETS_EXTENSION_METRICS": "emf",
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "info",
        "AWS_LAMBDA_LOG_FORMAT": fmt,
    })
    _known_sequence(ext)
    assert ext.stop() == 0, ext.stderr()
    after_ms = int(time.time() * 1000)
    text = ext.logs()
    emf = _emf_lines(text)
    assert len(emf) == 1, text
    doc = emf[0]
    meta = doc["_aws"]
    assert isinstance(meta["Timestamp"], int) and not isinstance(meta["Timestamp"], bool)
    assert before_ms - 1000 <= meta["Timestamp"] <= after_ms + 1000, meta
    directives = meta["CloudWatchMetrics"]
    assert isinstance(directives, list) and len(directives) == 1
    directive = directives[0]
    assert directive["Namespace"] == "ParametersSecretsExtension"
    assert directive["Dimensions"] == [["ExtensionName"]]
    metrics = directive["Metrics"]
    assert {m["Name"] for m in metrics} == EMF_METRICS
    assert len(metrics) == len(EMF_METRICS)
    for metric in metrics:
        assert metric["Unit"] == "Count", metric
        assert set(metric) <= {"Name", "Unit", "StorageResolution"}, metric
    assert doc["ExtensionName"] == "emf-ext"
    assert doc["ExtensionVersion"] == VERSION  # a property, not a dimension (see above)
    for name in EMF_METRICS:
        assert isinstance(doc[name], int) and not isinstance(doc[name], bool), (name, doc)
        assert doc[name] >= 0
    # The same figures as the summary line.
    summary = None
    for line in _lines(text):
        if fmt == "JSON":
            obj = json.loads(line)
            if "_aws" not in obj and SUMMARY_RE.search(obj["message"]):
                summary = _summary(obj["message"])
        elif SUMMARY_RE.search(line):
            summary = _summary(line)
    assert summary is not None, text
    assert doc["Hits"] == summary["hits"] == 3
    assert doc["Misses"] == summary["misses"]
    assert doc["AwsCalls"] == summary["aws_calls"] == 3
    assert doc["Errors"] == summary["errors"] == 1
    assert doc["StaleAnswers"] == summary["stale"] == 0
    assert doc["RefreshedAhead"] == summary["refreshed_ahead"] == 0
    # The EMF line is bare JSON on its own line, not wrapped in a log prefix or object.
    raw = [line for line in _lines(text) if '"_aws"' in line]
    assert len(raw) == 1 and raw[0].lstrip().startswith("{"), raw
    assert "message" not in doc or "_aws" in doc
