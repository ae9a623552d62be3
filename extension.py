"""An open, auditable AWS Parameters and Secrets Lambda Extension, in one stdlib-only file.

What it does
    Serves SSM Parameter Store parameters and Secrets Manager secrets to the code of a
    Lambda function over HTTP on loopback, from a TTL + LRU cache in front of the AWS
    APIs, exactly where the AWS extension serves them, so that function code written for
    the AWS layer works unchanged. Python 3.9+, standard library only, no SDK.

Routes (loopback only: 127.0.0.1, and ::1 where the host has it)
    GET /systemsmanager/parameters/get[/]?name=&version=|label=&withDecryption=&refreshNow=
    GET /secretsmanager/get[/]?secretId=&versionId=&versionStage=&refreshNow=
    GET /ping                                            200, no token needed (health check)
    Every route but /ping needs the header X-Aws-Parameters-Secrets-Token.
    Success: the AWS SDK's output shape as JSON, as the AWS extension answers, with the
    header X-Parameters-Secrets-Cache: hit | miss | stale | bypass.
    Errors: {"__type": ..., "message": ...}; AWS's own errors keep AWS's status.

Environment (read once at start into the frozen Config; nothing reads os.environ afterwards)
    SSM_PARAMETER_STORE_TIMEOUT_MILLIS            0     Parameter Store budget per request (0 = none)
    SECRETS_MANAGER_TIMEOUT_MILLIS                0     Secrets Manager budget per request (0 = none)
    SSM_PARAMETER_STORE_TTL                       300   seconds a parameter is cached (0 = bypass; max 3600)
    SECRETS_MANAGER_TTL                           300   seconds a secret is cached (0 = bypass; max 3600)
    PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED    TRUE  FALSE bypasses the cache
    PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE       1000  most cached items, 0-1000 (0 = bypass)
    PARAMETERS_SECRETS_EXTENSION_HTTP_PORT        2773  local port
    PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS  3     most connections to each AWS service
    PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL        info  debug | info | warn | error | none
    PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS 300  how long past expiry a value may be served
                                                        when AWS fails transiently (0 = never)
    PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS      64    most inbound connections at once (then 429)
    PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS 10000  a connection silent this long is
                                                        closed; one dribbling a request, at
                                                        twice this at the latest
    PARAMETERS_SECRETS_EXTENSION_PREFETCH         ""    "ssm:<name>[?query] secret:<id>[?query] ..."
                                                        fetched in the background at start
    PARAMETERS_SECRETS_EXTENSION_METRICS          none  emf: also print the shutdown figures as one
                                                        CloudWatch Embedded Metric Format line
    and the AWS SDK conventions: AWS_REGION / AWS_DEFAULT_REGION; AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; AWS_CONTAINER_CREDENTIALS_FULL_URI /
    _RELATIVE_URI with AWS_CONTAINER_AUTHORIZATION_TOKEN / _TOKEN_FILE; AWS_PROFILE,
    AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE; AWS_ENDPOINT_URL_SSM,
    AWS_ENDPOINT_URL_SECRETS_MANAGER, AWS_ENDPOINT_URL; AWS_USE_FIPS_ENDPOINT;
    AWS_LAMBDA_LOG_FORMAT (JSON: one JSON object per log line); AWS_LAMBDA_RUNTIME_API
    (set by Lambda: run the Extensions API lifecycle); AWS_TOKEN (the request token for
    runs outside Lambda, before AWS_SESSION_TOKEN and AWS_CONTAINER_AUTHORIZATION_TOKEN).
    The launcher (bootstrap) reads PARAMETERS_SECRETS_EXTENSION_PYTHON.

What it never does
    Listen beyond loopback; serve a request without the right token; log or echo a secret
    value, a parameter value or a token, at any level; cache an error; skip TLS
    verification; send the session token with credentials it does not belong to.

Usage: python3 extension.py [NAME]    (NAME: the extension's name, for logs and /register)
"""

import calendar  # free: the email package (http.server) imports it anyway
import errno
import hashlib
import hmac
import http.client
import http.server
import io
import json
import os
import re
import signal
import socket
import ssl  # free: http.client imports it anyway
import sys
import threading
import time
from collections import OrderedDict, namedtuple
from datetime import datetime, timezone
from urllib.parse import quote, unquote_to_bytes, urlsplit

DEFAULT_NAME = "parameters-secrets-extension"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# The official extension caps TTLs at 300 s. Users ask for longer (an hour of a value
# that changes once a quarter saves 11 of every 12 calls), and the open Secrets Manager
# Agent allows 3600 s, so we clamp there: long enough to matter, short enough that a
# rotated secret still shows within the hour.
TTL_CEILING = 3600

# (variable, Config field, default, minimum, maximum or None). Out-of-range values are
# clamped with a WARN; values that are not whole numbers fall back to the default.
INTEGER_SETTINGS = (
    ("SSM_PARAMETER_STORE_TIMEOUT_MILLIS", "ssm_timeout_ms", 0, 0, None),
    ("SECRETS_MANAGER_TIMEOUT_MILLIS", "secrets_timeout_ms", 0, 0, None),
    ("SSM_PARAMETER_STORE_TTL", "ssm_ttl", 300, 0, TTL_CEILING),
    ("SECRETS_MANAGER_TTL", "secrets_ttl", 300, 0, TTL_CEILING),
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_SIZE", "cache_size", 1000, 0, 1000),
    ("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "port", 2773, 1, 65535),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CONNECTIONS", "max_connections", 3, 1, None),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_STALE_SECONDS", "max_stale_seconds", 300, 0, 86400),
    ("PARAMETERS_SECRETS_EXTENSION_MAX_CLIENTS", "max_clients", 64, 1, 1024),
    ("PARAMETERS_SECRETS_EXTENSION_READ_TIMEOUT_MILLIS", "read_timeout_ms", 10000, 100, 600000),
)
# A port out of range is not clamped (port 0 or 1 is never what was meant): default.
NOT_CLAMPED = {"PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"}

# (variable, Config field, default, accepted values; compared in lower case)
CHOICE_SETTINGS = (
    ("PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED", "cache_enabled", "true", ("true", "false")),
    ("PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL", "log_level", "info",
     ("debug", "info", "warn", "error", "none")),
    ("PARAMETERS_SECRETS_EXTENSION_METRICS", "metrics", "none", ("none", "emf")),
)

# Every variable we read. A variable that is not one of these but looks like one
# (PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE, SECRET_MANAGER_TTL) earns a WARN naming
# the intended spelling: the official extension ignores typos silently.
SDK_VARIABLES = (
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_USE_FIPS_ENDPOINT",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_RUNTIME_API",
)
OUR_VARIABLES = tuple(row[0] for row in INTEGER_SETTINGS + CHOICE_SETTINGS) + (
    "PARAMETERS_SECRETS_EXTENSION_PREFETCH",
    "PARAMETERS_SECRETS_EXTENSION_PYTHON",  # read by bootstrap, not here
)
KNOWN_VARIABLES = frozenset(OUR_VARIABLES + SDK_VARIABLES)
# Only names containing one of these words are compared with ours, so that unrelated
# variables (PATH, MY_APP_TTL) never cost a comparison or a false warning.
NEAR_MISS_WORDS = ("PARAMETER", "SECRET", "SSM", "EXTENSION", "ENDPOINT_URL")


# (field, default): what load_config fills in from the environment.
CONFIG_FIELDS = (
    ("port", 2773), ("ssm_timeout_ms", 0), ("secrets_timeout_ms", 0), ("ssm_ttl", 300),
    ("secrets_ttl", 300), ("cache_enabled", True), ("cache_size", 1000), ("max_connections", 3),
    ("log_level", "info"), ("max_stale_seconds", 300), ("max_clients", 64), ("read_timeout_ms", 10000),
    ("prefetch", ()), ("metrics", "none"), ("log_format", "text"),
    ("region", None), ("ssm_endpoint", None), ("secrets_endpoint", None), ("endpoint_error", None),
    ("lambda_runtime_api", None), ("home", None),
    ("request_token", None), ("access_key_id", None), ("secret_access_key", None), ("session_token", None),
    ("container_full_uri", None), ("container_relative_uri", None), ("container_token", None),
    ("container_token_file", None), ("profile", "default"), ("shared_credentials_file", None),
    ("config_file", None),
)
# Kept out of repr(), so that no log line can ever print them.
SECRET_FIELDS = frozenset(("request_token", "secret_access_key", "session_token", "container_token"))


class Config(namedtuple("Config", [name for name, _ in CONFIG_FIELDS],
                        defaults=[default for _, default in CONFIG_FIELDS])):
    """Everything the extension reads from its environment, read once by load_config.

    Frozen: a named tuple, whose fields cannot be assigned. Not a dataclass: importing
    dataclasses pulls in inspect and ast, ~15 ms of every cold start (bench/)."""

    __slots__ = ()

    def __repr__(self):
        shown = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self)
                          if name not in SECRET_FIELDS)
        return f"Config({shown})"


def _present(environ, name):
    """An empty variable counts as absent: the Lambda RIE sets AWS_SESSION_TOKEN= when unset."""
    value = environ.get(name)
    return value if value else None


def load_config(environ):
    """Read the environment once. Returns (Config, [(level, message), ...]) without logging,
    so that it stays a pure function and the caller logs once its logger exists."""
    messages = []
    values = {}
    for variable, name, default, minimum, maximum in INTEGER_SETTINGS:
        raw = environ.get(variable)
        value = default
        if raw is None:
            messages.append(("debug", f"{variable} not present, using default {default}"))
        elif not re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            messages.append(("warn", f"{variable}={raw!r} is not a whole number, using default {default}"))
        else:
            value = int(raw)
            if variable in NOT_CLAMPED and not minimum <= value <= maximum:
                messages.append(("warn", f"{variable}={value} is outside {minimum}-{maximum}, using default {default}"))
                value = default
            elif value < minimum:
                messages.append(("warn", f"{variable}={value} is below the minimum {minimum}, using {minimum}"))
                value = minimum
            elif maximum is not None and value > maximum:
                messages.append(("warn", f"{variable}={value} is above the maximum {maximum}, using {maximum}"))
                value = maximum
        values[name] = value
    for variable, name, default, accepted in CHOICE_SETTINGS:
        raw = environ.get(variable)
        value = default
        if raw is None:
            messages.append(("debug", f"{variable} not present, using default {default}"))
        elif raw.strip().lower() in accepted:
            value = raw.strip().lower()
        else:
            messages.append(("warn", f"{variable}={raw!r} is not one of {', '.join(accepted)} (any case), "
                                     f"using default {default}"))
        values[name] = value
    values["cache_enabled"] = values["cache_enabled"] == "true"

    prefetch = environ.get("PARAMETERS_SECRETS_EXTENSION_PREFETCH", "")
    values["prefetch"] = tuple(entry for entry in re.split(r"[\s,]+", prefetch) if entry)
    values["log_format"] = "json" if (environ.get("AWS_LAMBDA_LOG_FORMAT") or "").upper() == "JSON" else "text"

    region = _present(environ, "AWS_REGION") or _present(environ, "AWS_DEFAULT_REGION")
    values["region"] = region
    if region:
        try:
            values["ssm_endpoint"] = endpoint_url("ssm", region, environ)
            values["secrets_endpoint"] = endpoint_url("secretsmanager", region, environ)
        except ValueError as error:
            values["endpoint_error"] = str(error)

    values["request_token"] = (_present(environ, "AWS_TOKEN") or _present(environ, "AWS_SESSION_TOKEN")
                               or _present(environ, "AWS_CONTAINER_AUTHORIZATION_TOKEN"))
    values["access_key_id"] = _present(environ, "AWS_ACCESS_KEY_ID")
    values["secret_access_key"] = _present(environ, "AWS_SECRET_ACCESS_KEY")
    values["session_token"] = _present(environ, "AWS_SESSION_TOKEN")
    values["container_full_uri"] = _present(environ, "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    values["container_relative_uri"] = _present(environ, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    values["container_token"] = _present(environ, "AWS_CONTAINER_AUTHORIZATION_TOKEN")
    values["container_token_file"] = _present(environ, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    values["profile"] = _present(environ, "AWS_PROFILE") or "default"
    values["home"] = _present(environ, "HOME")
    values["shared_credentials_file"] = _present(environ, "AWS_SHARED_CREDENTIALS_FILE")
    values["config_file"] = _present(environ, "AWS_CONFIG_FILE")
    values["lambda_runtime_api"] = _present(environ, "AWS_LAMBDA_RUNTIME_API")

    messages.extend(("warn", text) for text in near_miss_warnings(environ))
    return Config(**values), messages


def near_miss_warnings(environ):
    """WARN texts for variables that look like ours but are not spelled as ours."""
    candidates = [name for name in environ if name not in KNOWN_VARIABLES
                  and any(word in name.upper() for word in NEAR_MISS_WORDS)]
    if not candidates:
        return []
    import difflib  # only when there is something to compare: keeps start-up lean

    # Compared without the separators and the word AND: the commonest typos are
    # PARAMETERS_AND_SECRETS_..., a missing S and a missing underscore.
    table = {re.sub(r"_|AND", "", known): known for known in KNOWN_VARIABLES}
    warnings = []
    for name in sorted(candidates):
        upper = name.upper()
        if upper in KNOWN_VARIABLES:
            intended = upper  # variable names are case-sensitive
        else:
            squashed = re.sub(r"_|AND", "", upper)
            close = difflib.get_close_matches(squashed, table, n=1, cutoff=0.85)
            if not close:
                continue
            intended = table[close[0]]
        warnings.append(f"ignoring {name}: did you mean {intended}?")
    return warnings


# Where each partition keeps its endpoints (checked against botocore's endpoint rules).
PARTITION_SUFFIXES = (
    ("cn-", "amazonaws.com.cn"),
    ("us-isob-", "sc2s.sgov.gov"),
    ("us-isof-", "csp.hci.ic.gov"),
    ("us-iso-", "c2s.ic.gov"),
    ("eu-isoe-", "cloud.adc-e.uk"),
)
ENDPOINT_OVERRIDES = {"ssm": "AWS_ENDPOINT_URL_SSM", "secretsmanager": "AWS_ENDPOINT_URL_SECRETS_MANAGER"}


def endpoint_url(service, region, environ):
    """The base URL for service ("ssm" or "secretsmanager") in region, as the SDKs choose it:
    a service override, then AWS_ENDPOINT_URL, then the partition's (FIPS) endpoint."""
    for variable in (ENDPOINT_OVERRIDES[service], "AWS_ENDPOINT_URL"):
        override = _present(environ, variable)
        if override:
            parts = urlsplit(override)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{variable}={override!r} is not an http(s) URL with a host")
            return override.rstrip("/")
    if not re.fullmatch(r"[a-z0-9-]+", region):
        raise ValueError(f"region {region!r} is not a region name")
    suffix = next((s for prefix, s in PARTITION_SUFFIXES if region.startswith(prefix)), "amazonaws.com")
    fips = (_present(environ, "AWS_USE_FIPS_ENDPOINT") or "").lower() == "true"
    host = service
    # GovCloud's Parameter Store endpoint is FIPS-validated already and has no -fips name.
    if fips and not (service == "ssm" and region.startswith("us-gov-")):
        host += "-fips"
    return f"https://{host}.{region}.{suffix}"


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40, "none": 100}


class Logger:
    """Lines on stderr: "[name] LEVEL message", or one JSON object per line when the
    function uses Lambda's JSON log format. Callers never pass a secret value or a token:
    parameter names, secret ids and error types are the most a line ever holds."""

    def __init__(self, name, level="info", log_format="text", stream=None):
        self.name = name
        self.threshold = LEVELS[level]
        self.json = log_format == "json"
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def enabled(self, level):
        return LEVELS[level] >= self.threshold

    def log(self, level, message):
        if LEVELS[level] < self.threshold:
            return
        if self.json:
            now = time.time()
            line = json.dumps({"timestamp": iso8601(now), "level": level.upper(), "message": message,
                               "extension": self.name})
        else:
            line = f"[{self.name}] {level.upper()} {message}"
        with self.lock:  # one writer at a time, so lines from threads never interleave
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must never take the server down

    def debug(self, message):
        self.log("debug", message)

    def info(self, message):
        self.log("info", message)

    def warn(self, message):
        self.log("warn", message)

    def error(self, message):
        self.log("error", message)


def iso8601(epoch_seconds):
    """2022-11-16T08:22:40.362Z: the SDK's timestamp text, UTC with milliseconds."""
    total_ms = int(round(epoch_seconds * 1000))
    seconds, ms = divmod(total_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % ms


# ---------------------------------------------------------------------------
# SigV4 (pure functions, one per step of AWS's "Create a signed AWS API request")
# ---------------------------------------------------------------------------

ALGORITHM = "AWS4-HMAC-SHA256"


class Credentials:
    """An access key pair, with the session token and expiry of temporary credentials."""

    __slots__ = ("access_key_id", "secret_access_key", "session_token", "expiration")

    def __init__(self, access_key_id, secret_access_key, session_token=None, expiration=None):
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.session_token = session_token
        self.expiration = expiration  # epoch seconds, or None for credentials that do not expire

    def __repr__(self):  # never the secret key or the token
        return f"Credentials(access_key_id={self.access_key_id!r}, expiration={self.expiration!r})"


def _uri_encode(text, safe):
    # AWS's UriEncode: every byte but the unreserved A-Z a-z 0-9 - _ . ~ is %XX, upper case.
    return quote(text, safe=safe)


def canonical_query_string(query):
    """Step 1c: each key=value decoded, re-encoded the AWS way, sorted by key then value."""
    pairs = []
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        pairs.append((_uri_encode(unquote_to_bytes(key), "-_.~"), _uri_encode(unquote_to_bytes(value), "-_.~")))
    return "&".join(f"{key}={value}" for key, value in sorted(pairs))


def _canonical_header_map(headers):
    # Names lower-cased; values trimmed with inner runs of white space (obs-fold too)
    # collapsed to one space; a repeated header's values joined by commas in order.
    merged = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    return {name: ",".join(values) for name, values in merged.items()}


def signed_header_names(headers):
    """Step 1e: the lower-cased names of the signed headers, sorted, joined by ';'."""
    return ";".join(sorted(_canonical_header_map(headers)))


def canonical_request(method, path, query, headers, payload_hash):
    """Step 1: the canonical request. Every header given is signed; path is unencoded."""
    header_map = _canonical_header_map(headers)
    canonical_headers = "".join(f"{name}:{header_map[name]}\n" for name in sorted(header_map))
    return "\n".join((
        method,
        _uri_encode(path or "/", "/-_.~"),
        canonical_query_string(query),
        canonical_headers,
        ";".join(sorted(header_map)),
        payload_hash,
    ))


def credential_scope(date_stamp, region, service):
    """Step 2 (part): date/region/service/aws4_request."""
    return f"{date_stamp}/{region}/{service}/aws4_request"


def string_to_sign(amz_date, scope, canonical_request_text):
    """Step 2: the algorithm, the time, the scope and the hash of the canonical request."""
    digest = hashlib.sha256(canonical_request_text.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signing_key(secret_key, date_stamp, region, service):
    """Step 3: the key derived from the secret access key, one HMAC per scope element."""
    key = hmac.new(("AWS4" + secret_key).encode("utf-8"), date_stamp.encode("utf-8"), hashlib.sha256).digest()
    for element in (region, service, "aws4_request"):
        key = hmac.new(key, element.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key, string_to_sign_text):
    """Step 4: the hex HMAC of the string to sign."""
    return hmac.new(key, string_to_sign_text.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(method, url, headers, body, credentials, region, service, now):
    """All the headers to send for a signed request: the given ones plus Host (as sent,
    port included), X-Amz-Date, X-Amz-Security-Token when the credentials carry one, and
    Authorization. The session token is signed only with the credentials it came with."""
    parts = urlsplit(url)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date_stamp = amz_date[:8]
    to_sign = list(headers) + [("Host", parts.netloc), ("X-Amz-Date", amz_date)]
    if credentials.session_token:
        to_sign.append(("X-Amz-Security-Token", credentials.session_token))
    path = unquote_to_bytes(parts.path or "/").decode("utf-8")
    request = canonical_request(method, path, parts.query, to_sign, hashlib.sha256(body).hexdigest())
    scope = credential_scope(date_stamp, region, service)
    key = signing_key(credentials.secret_access_key, date_stamp, region, service)
    authorization = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                     f"SignedHeaders={signed_header_names(to_sign)}, "
                     f"Signature={signature(key, string_to_sign(amz_date, scope, request))}")
    return to_sign + [("Authorization", authorization)]


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------

class CredentialsError(Exception):
    """No usable credentials. The message names what was looked for."""


# Refresh temporary credentials this long before they expire, so that a request signed
# just before expiry is not refused on arrival.
REFRESH_WINDOW_SECONDS = 300
CONTAINER_HOST = "169.254.170.2"
# Hosts that may receive the container authorization token over plain http, as the
# SDKs allow: loopback, and the ECS / EKS credential addresses. Any host over https.
CONTAINER_HTTP_HOSTS = ("127.0.0.1", "localhost", "::1", "169.254.170.2", "169.254.170.23", "fd00:ec2::23")
# Keys of a profile that need an SDK or the CLI (SSO, role assumption, a helper program).
PROFILE_NEEDS_SDK = ("role_arn", "sso_session", "sso_start_url", "sso_account_id", "credential_process",
                     "web_identity_token_file", "source_profile", "credential_source")


class CredentialProvider:
    """Credentials in the SDKs' order: environment keys, then container credentials
    (Lambda SnapStart, ECS), then static keys of the shared credentials file. Container
    credentials are fetched when first needed and refreshed before they expire."""

    def __init__(self, config, log, clock=time.time):
        self.config = config
        self.log = log
        self.clock = clock
        self.lock = threading.Lock()  # serialises refreshes; held during the local HTTP call
        self.current = None
        self.source = None

    def resolve(self):
        """Choose the source at start (no network). Raises CredentialsError."""
        c = self.config
        if c.access_key_id and c.secret_access_key:
            self.source = "environment"
            self.current = Credentials(c.access_key_id, c.secret_access_key, c.session_token)
        elif c.container_full_uri or c.container_relative_uri:
            self.source = "container"
            self.container_url()  # validates the URL now rather than at the first request
        else:
            self.current = self._from_shared_files()
            if self.current is None:
                raise CredentialsError(
                    "no AWS credentials: looked for AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI / _RELATIVE_URI, and profile "
                    f"{c.profile!r} in {self._credentials_path()}")
            self.source = "shared credentials file"
        self.log.debug(f"credentials from the {self.source}")
        return self.source

    def get(self):
        """Current credentials; container credentials refreshed when near expiry."""
        current = self.current
        if current is not None and (current.expiration is None
                                    or current.expiration - self.clock() > REFRESH_WINDOW_SECONDS):
            return current
        with self.lock:
            current = self.current
            if current is not None and (current.expiration is None
                                        or current.expiration - self.clock() > REFRESH_WINDOW_SECONDS):
                return current  # another thread refreshed while we waited
            try:
                self.current = self._from_container()
            except CredentialsError as error:
                if current is not None and current.expiration > self.clock():
                    self.log.warn(f"refreshing container credentials failed ({error}); "
                                  "using the current ones until they expire")
                    return current
                raise
            return self.current

    def container_url(self):
        c = self.config
        if c.container_relative_uri:  # the SDKs look at the relative URI first
            return f"http://{CONTAINER_HOST}{c.container_relative_uri}"
        parts = urlsplit(c.container_full_uri)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in CONTAINER_HTTP_HOSTS):
            return c.container_full_uri
        raise CredentialsError(f"AWS_CONTAINER_CREDENTIALS_FULL_URI host {parts.hostname!r} is not allowed: "
                               "use https, loopback or the container credentials address")

    def _from_container(self):
        c = self.config
        url = self.container_url()
        headers = {"Accept": "application/json"}
        token = c.container_token
        if c.container_token_file:
            try:  # read on every refresh: the platform may rotate the file
                with open(c.container_token_file, encoding="utf-8") as token_file:
                    token = token_file.read().strip()
            except OSError as error:
                raise CredentialsError(f"cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: {error.strerror}")
        if token:
            headers["Authorization"] = token
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        try:
            connection = _new_connection(parts, timeout=2.0)
            try:
                connection.request("GET", target or "/", headers=headers)
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            raise CredentialsError(f"container credentials endpoint unreachable: {type(error).__name__}")
        if response.status != 200:
            raise CredentialsError(f"container credentials endpoint answered {response.status}")
        try:
            data = json.loads(body)
            expiration = data.get("Expiration")
            return Credentials(data["AccessKeyId"], data["SecretAccessKey"], data.get("Token"),
                               parse_iso8601(expiration) if expiration else None)
        except (ValueError, KeyError, TypeError):
            raise CredentialsError("container credentials endpoint answered malformed JSON")

    def _credentials_path(self):
        c = self.config
        return c.shared_credentials_file or os.path.join(c.home or "~", ".aws", "credentials")

    def _from_shared_files(self):
        c = self.config
        import configparser  # only for local runs: Lambda never has a credentials file

        sections = []
        config_path = c.config_file or os.path.join(c.home or "~", ".aws", "config")
        for path, section in ((self._credentials_path(), c.profile),
                              (config_path, c.profile if c.profile == "default" else f"profile {c.profile}")):
            parser = configparser.RawConfigParser()
            try:
                parser.read(path, encoding="utf-8")
            except (configparser.Error, UnicodeDecodeError):
                raise CredentialsError(f"cannot parse {path}")
            if parser.has_section(section):
                sections.append(dict(parser.items(section)))
        for values in sections:
            if values.get("aws_access_key_id") and values.get("aws_secret_access_key"):
                return Credentials(values["aws_access_key_id"], values["aws_secret_access_key"],
                                   values.get("aws_session_token") or None)
        if any(key in values for values in sections for key in PROFILE_NEEDS_SDK):
            raise CredentialsError(
                f"profile {c.profile!r} needs SSO or role assumption, which this extension does not do: "
                f'export its credentials first: eval "$(aws configure export-credentials '
                f'--profile {c.profile} --format env)"')
        return None


def parse_iso8601(text):
    """Epoch seconds of an ISO-8601 time such as 2026-11-26T16:00:00Z (a fraction and a
    +hh:mm offset are honoured; no offset means UTC)."""
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?", text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 time: {text!r}")
    seconds = calendar.timegm(tuple(int(part) for part in match.groups()[:6]) + (0, 0, 0))
    offset = match.group(8)
    if offset and offset != "Z":
        sign = -1 if offset[0] == "+" else 1
        digits = offset[1:].replace(":", "")
        seconds += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds + float(match.group(7) or 0)


# ---------------------------------------------------------------------------
# AWS client: AWS JSON 1.1 over keep-alive connections, retries, budgets
# ---------------------------------------------------------------------------

class UpstreamError(Exception):
    """A failed AWS call. transient: worth a retry, and a stale value may answer instead."""

    transient = False


class AwsError(UpstreamError):
    """AWS answered with an error: passed to the caller with AWS's status and type."""

    def __init__(self, status, error_type, message):
        super().__init__(f"{error_type} ({status})")
        self.status = status
        self.error_type = error_type
        self.message = message
        self.transient = status >= 500 or status == 429 or error_type in THROTTLING_ERRORS


class UpstreamUnreachable(UpstreamError):
    """No answer could be had: connection refused, reset, closed mid-body, bad TLS."""

    transient = True


class UpstreamTimeout(UpstreamError):
    """AWS did not answer within the service's time budget."""

    transient = True


# The AWS SDKs' throttling error codes (standard retry mode).
THROTTLING_ERRORS = frozenset((
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
))
MAX_ATTEMPTS = 3          # the SDKs' standard retry mode: three attempts in all
BACKOFF_BASE = 0.05       # seconds; full jitter: sleep uniform(0, base * 2 ** attempt)
BACKOFF_CAP = 1.0         # a Lambda caller waits: never sleep longer than this
# With no budget configured (TIMEOUT_MILLIS=0, "no timeout" officially), each attempt
# still gives up after this much silence: a black-holed connection must not hang a
# caller forever. The SDKs' defaults (60 s) are longer than most Lambda functions live.
ATTEMPT_TIMEOUT_WITHOUT_BUDGET = 10.0
IDLE_CONNECTION_SECONDS = 20.0  # AWS closes idle keep-alive connections; do not reuse older
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"


def _new_connection(parts, timeout):
    port = parts.port
    if parts.scheme == "https":
        context = ssl.create_default_context()  # certificates and host names verified
        return http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
    return http.client.HTTPConnection(parts.hostname, port, timeout=timeout)


class ServiceClient:
    """Calls one AWS service's JSON 1.1 API. At most max_connections connections are open
    at once; idle ones are kept for reuse. The lock guards only the list of idle
    connections; no lock is held during network I/O."""

    def __init__(self, service, endpoint, region, credentials, timeout_ms, max_connections, stats,
                 log, clock=time.monotonic, sleep=time.sleep):
        self.service = service
        self.endpoint = endpoint
        self.parts = urlsplit(endpoint)
        self.path = self.parts.path or "/"
        self.url = endpoint if self.parts.path else endpoint + "/"
        self.region = region
        self.credentials = credentials
        self.budget = timeout_ms / 1000.0 if timeout_ms else None
        self.slots = threading.BoundedSemaphore(max_connections)
        self.idle = []            # [(connection, last used)]; newest last
        self.lock = threading.Lock()
        self.stats = stats
        self.log = log
        self.clock = clock
        self.sleep = sleep

    def call(self, target, payload):
        """One API call with retries; returns the decoded JSON answer or raises UpstreamError."""
        body = json.dumps(payload).encode("utf-8")
        deadline = self.clock() + self.budget if self.budget else None
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(target, body, deadline, MAX_ATTEMPTS - attempt + 1)
            except UpstreamError as error:
                if not error.transient or attempt >= MAX_ATTEMPTS:
                    raise
                import random  # only on the retry path

                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
                if deadline is not None and self.clock() + delay >= deadline:
                    raise  # no time left for another attempt within the caller's budget
                self.log.debug(f"{target} attempt {attempt} failed ({error}); retrying in {delay * 1000:.0f} ms")
                self.sleep(delay)

    def _attempt(self, target, body, deadline, attempts_left):
        timeout = ATTEMPT_TIMEOUT_WITHOUT_BUDGET
        if deadline is not None:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise UpstreamTimeout(f"{self.service} budget spent")
            # An attempt that is not the last gets half of what is left: a connection
            # that never answers leaves time for a retry, and the first attempt, the
            # one that normally succeeds, gets the largest share.
            timeout = remaining if attempts_left == 1 else remaining / 2
        if not self.slots.acquire(timeout=timeout):
            raise UpstreamTimeout(f"no free connection to {self.service} in time")
        connection = None
        try:
            connection = self._connection(timeout)
            headers = sign_request("POST", self.url, [("Content-Type", JSON_CONTENT_TYPE), ("X-Amz-Target", target)],
                                   body, self.credentials.get(), self.region, self.service,
                                   datetime.now(timezone.utc))
            self.stats.add("aws_calls")
            connection.putrequest("POST", self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            status = response.status
            if response.will_close:
                connection.close()
            else:
                self._release(connection)
            connection = None
        except CredentialsError as error:
            raise UpstreamUnreachable(f"credentials: {error}")
        except socket.timeout:
            raise UpstreamTimeout(f"{self.service} did not answer in time")
        except (OSError, http.client.HTTPException) as error:
            raise UpstreamUnreachable(f"{self.service} unreachable: {type(error).__name__}")
        finally:
            if connection is not None:
                connection.close()
            self.slots.release()
        if status == 200:
            try:
                return json.loads(data)
            except ValueError:
                raise UpstreamUnreachable(f"{self.service} answered 200 with a body that is not JSON")
        raise aws_error(status, data)

    def _connection(self, timeout):
        now = self.clock()
        with self.lock:
            while self.idle:
                connection, last_used = self.idle.pop()
                if now - last_used < IDLE_CONNECTION_SECONDS and connection.sock is not None:
                    connection.sock.settimeout(timeout)
                    return connection
                connection.close()
        connection = _new_connection(self.parts, timeout)
        connection.connect()
        if connection.sock is not None:  # small requests and answers: no Nagle delay
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _release(self, connection):
        with self.lock:
            self.idle.append((connection, self.clock()))


def aws_error(status, data):
    """AwsError from an error answer: AWS JSON ({"__type": "...#Code", "message"}), or the
    XML that moto (and AWS's front door) use for signature errors."""
    error_type, message = "UnknownError", ""
    text = data.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            error_type = str(parsed.get("__type") or parsed.get("code") or parsed.get("Code") or error_type)
            message = str(parsed.get("message") or parsed.get("Message") or "")
    except ValueError:
        code = re.search(r"<Code>([^<]*)</Code>", text)
        found = re.search(r"<Message>(?:<!\[CDATA\[(.*?)\]\]>|([^<]*))</Message>", text, re.DOTALL)
        error_type = code.group(1) if code else error_type
        message = (found.group(1) or found.group(2) or "") if found else ""
    error_type = error_type.rsplit("#", 1)[-1].split(":", 1)[0]  # com.amazonaws.ssm#ParameterNotFound
    return AwsError(status, error_type, message[:1024])


# ---------------------------------------------------------------------------
# Cache: TTL + LRU
# ---------------------------------------------------------------------------

class TTLCache:
    """A least-recently-used cache whose entries also expire.

    Entries live in an OrderedDict from least to most recently used; an entry is
    (value, expires_at) on the injected clock. Expired entries are kept a while
    (max_stale seconds) so that they can answer when AWS fails; past that they are dead
    and dropped. Lock rules: self.lock guards self.entries and is held only for the
    dictionary operations of one method call, never during I/O or a call out.
    """

    def __init__(self, max_items, max_stale=0.0, clock=time.monotonic):
        self.max_items = max_items
        self.max_stale = max_stale
        self.clock = clock
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        """The value if fresh, else None. A hit becomes the most recently used."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            now = self.clock()
            if now < entry[1]:
                self.entries.move_to_end(key)         # LRU: used now
                return entry[0]
            if now >= entry[1] + self.max_stale:
                del self.entries[key]                 # dead: past any stale use
            return None

    def get_stale(self, key):
        """An expired value still within max_stale seconds of its expiry, else None."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and self.clock() < entry[1] + self.max_stale:
                return entry[0]
            return None

    def put(self, key, value, ttl):
        with self.lock:
            now = self.clock()
            self.entries[key] = (value, now + ttl)
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_items:
                self.entries.popitem(last=False)      # evict the least recently used
            # Drop dead entries at the cold end while there are any: keeps memory to
            # what can still be served, at O(1) amortised cost per put.
            while self.entries:
                oldest_key, (_, expires_at) = next(iter(self.entries.items()))
                if now < expires_at + self.max_stale:
                    break
                del self.entries[oldest_key]

    def __len__(self):
        with self.lock:
            return len(self.entries)


class Stats:
    """Counters for the shutdown summary and the metrics line."""

    NAMES = ("hits", "misses", "aws_calls", "errors", "stale")

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name):
        with self.lock:
            self.counts[name] += 1

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


class _Flight:
    """One AWS call in progress for a key; the requests that wait for it share its result."""

    __slots__ = ("done", "value", "state", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value = self.state = self.error = None


class Store:
    """The cache, the rule of one AWS call per miss, and serving stale values when AWS
    fails transiently. Lock rules: self.lock guards self.flights only; the AWS call is
    made with no lock held."""

    def __init__(self, cache, stats, log):
        self.cache = cache
        self.stats = stats
        self.log = log
        self.flights = {}
        self.lock = threading.Lock()

    def get(self, key, fetch, ttl, refresh=False):
        """(body, state) for key, state one of hit / miss / stale / bypass. fetch() makes
        the AWS call and returns the body; ttl 0 means this key is never cached."""
        if ttl and not refresh:
            body = self.cache.get(key)
            if body is not None:
                self.stats.add("hits")
                return body, "hit"
        with self.lock:
            flight = self.flights.get(key)
            leader = flight is None
            if leader:
                flight = self.flights[key] = _Flight()
        if not leader:
            flight.done.wait()  # bounded: the leader's call has its own time limits
            if flight.error is not None:
                raise flight.error
            return flight.value, flight.state
        try:
            flight.value, flight.state = self._fetch(key, fetch, ttl, refresh)
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self.lock:
                del self.flights[key]
            flight.done.set()
        return flight.value, flight.state

    def _fetch(self, key, fetch, ttl, refresh):
        if ttl and not refresh:
            body = self.cache.get(key)  # filled by a flight that ended while we queued
            if body is not None:
                self.stats.add("hits")
                return body, "hit"
        self.stats.add("misses")
        try:
            body = fetch()
        except UpstreamError as error:
            self.stats.add("errors")
            stale = self.cache.get_stale(key) if ttl and error.transient else None
            if stale is None:
                raise
            self.stats.add("stale")
            self.log.warn(f"serving a stale value for {describe_key(key)}: AWS failed ({error})")
            return stale, "stale"
        if not ttl:
            return body, "bypass"
        self.cache.put(key, body, ttl)
        return body, "miss"


def describe_key(key):
    """A key for a log line: service and name or id, never a value."""
    return f"{key[0]} {key[1]!r}"


# ---------------------------------------------------------------------------
# Requests: query parsing, the AWS call each route makes, the official answer shape
# ---------------------------------------------------------------------------

class ClientError(Exception):
    """A request we refuse: status, our error type, and a message naming the problem."""

    def __init__(self, status, error_type, message):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


MAX_NAME_LENGTH = 2048  # SSM parameter names and Secrets Manager ids: 2048 at most
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def parse_query(query):
    """[(key, value)] from a query string, strictly: bad %-escapes, bytes that are not
    UTF-8 and control characters are refused. '+' stays '+' (secret names may hold it;
    no name may hold a space), unlike form decoding."""
    pairs = []
    for part in query.split("&") if query else ():
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        pairs.append((_decode(raw_key), _decode(raw_value)))
    return pairs


def _decode(text):
    if "%" not in text and text.isascii() and not CONTROL_CHARACTERS.search(text):
        return text  # the common case: nothing to decode
    if BAD_ESCAPE.search(text):
        raise ClientError(400, "MalformedQuery", "the query has an invalid percent-encoding")
    try:
        # The request line arrives decoded as Latin-1: undo that to get the raw bytes.
        decoded = unquote_to_bytes(text.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ClientError(400, "MalformedQuery", "the query is not valid UTF-8")
    if CONTROL_CHARACTERS.search(decoded):
        raise ClientError(400, "MalformedQuery", "the query holds a control character")
    return decoded


def _single_values(pairs, allowed):
    """{key: value} with unknown and repeated keys refused. A near-miss unknown key (a
    typo such as withdecryption) is named with the intended key: it must not silently
    return ciphertext."""
    values = {}
    for key, value in pairs:
        if key not in allowed:
            hint = next((known for known in allowed if known.lower() == key.lower()), None)
            if hint is None:
                import difflib

                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
                hint = close[0] if close else None
            suffix = f"; did you mean {hint!r}?" if hint else f"; known keys: {', '.join(allowed)}"
            raise ClientError(400, "UnknownQueryKey", f"unknown query key {key[:64]!r}{suffix}")
        if key in values:
            raise ClientError(400, "RepeatedQueryKey", f"query key {key!r} is given more than once")
        values[key] = value
    return values


# withDecryption takes true / false as the official extension does; refreshNow also
# takes 1 / 0, as the open Secrets Manager Agent's refreshNow does. Any case.
BOOLEAN_WORDS = {
    "withDecryption": {"true": True, "false": False},
    "refreshNow": {"true": True, "false": False, "1": True, "0": False},
}


def _boolean(values, key):
    value = values.get(key)
    if value is None:
        return False
    words = BOOLEAN_WORDS[key]
    try:
        return words[value.lower()]
    except KeyError:
        raise ClientError(400, "InvalidQueryValue", f"{key} must be {' or '.join(words)} (any case)")


def _identifier(values, key, what):
    value = values.get(key)
    if value is None:
        raise ClientError(400, "MissingQueryKey", f"the query key {key!r} ({what}) is required")
    if not value:
        raise ClientError(400, "InvalidQueryValue", f"{key} is empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ClientError(400, "InvalidQueryValue", f"{key} is longer than {MAX_NAME_LENGTH} characters")
    return value


class Fetch:
    """What one request asks for: its cache key, the AWS call, and how to shape the answer."""

    __slots__ = ("service", "key", "target", "payload", "selector", "refresh")

    def __init__(self, service, key, target, payload, selector, refresh):
        self.service = service
        self.key = key
        self.target = target
        self.payload = payload
        self.selector = selector
        self.refresh = refresh


PARAMETER_KEYS = ("name", "version", "label", "withDecryption", "refreshNow")
SECRET_KEYS = ("secretId", "versionId", "versionStage", "refreshNow")


def parameter_fetch(pairs):
    values = _single_values(pairs, PARAMETER_KEYS)
    name = _identifier(values, "name", "the parameter name")
    decrypt = _boolean(values, "withDecryption")
    refresh = _boolean(values, "refreshNow")
    # version and label are both selectors; the official extension uses the one that
    # comes first in the query string and ignores the other (documented behaviour).
    selector = None
    for key, value in pairs:
        if key == "version":
            if not re.fullmatch(r"[1-9][0-9]{0,18}", value):
                raise ClientError(400, "InvalidQueryValue", "version must be a positive whole number")
            selector = ":" + value
            break
        if key == "label":
            if not value or len(value) > 100:
                raise ClientError(400, "InvalidQueryValue", "label must be 1 to 100 characters")
            selector = ":" + value
            break
    payload = {"Name": name + (selector or ""), "WithDecryption": decrypt}
    return Fetch("ssm", ("ssm", name, selector, decrypt), "AmazonSSM.GetParameter", payload, selector, refresh)


def secret_fetch(pairs):
    values = _single_values(pairs, SECRET_KEYS)
    secret_id = _identifier(values, "secretId", "the secret name or ARN")
    refresh = _boolean(values, "refreshNow")
    payload = {"SecretId": secret_id}
    for key, field_name, limit in (("versionId", "VersionId", 64), ("versionStage", "VersionStage", 256)):
        value = values.get(key)
        if value is not None:
            if not value or len(value) > limit:
                raise ClientError(400, "InvalidQueryValue", f"{key} must be 1 to {limit} characters")
            payload[field_name] = value
    key = ("secretsmanager", secret_id, values.get("versionId"), values.get("versionStage"))
    return Fetch("secretsmanager", key, "secretsmanager.GetSecretValue", payload, None, refresh)


def _timestamp(value):
    return iso8601(value) if isinstance(value, (int, float)) else value


def render_parameter(answer, selector):
    """The SDK's GetParameter output as the official extension serialises it."""
    wire = answer.get("Parameter") or {}
    parameter = {
        "ARN": wire.get("ARN"),
        "DataType": wire.get("DataType"),
        "LastModifiedDate": _timestamp(wire.get("LastModifiedDate")),
        "Name": wire.get("Name"),
        # AWS echoes the selector; moto answers null, so the request's own is used then.
        "Selector": wire.get("Selector") or selector,
        "SourceResult": wire.get("SourceResult"),
        "Type": wire.get("Type"),
        "Value": wire.get("Value"),
        "Version": wire.get("Version"),
    }
    return json.dumps({"Parameter": parameter, "ResultMetadata": {}}).encode("utf-8")


def render_secret(answer):
    """The SDK's GetSecretValue output as the official extension serialises it (binary
    stays the base64 text AWS sent)."""
    secret = {
        "ARN": answer.get("ARN"),
        "CreatedDate": _timestamp(answer.get("CreatedDate")),
        "Name": answer.get("Name"),
        "SecretBinary": answer.get("SecretBinary"),
        "SecretString": answer.get("SecretString"),
        "VersionId": answer.get("VersionId"),
        "VersionStages": answer.get("VersionStages"),
        "ResultMetadata": {},
    }
    return json.dumps(secret).encode("utf-8")


def error_status_and_body(error):
    """The one place where failures become HTTP answers. Bodies never hold a value or token."""
    if isinstance(error, ClientError):
        status, error_type, message = error.status, error.error_type, error.message
    elif isinstance(error, AwsError):
        status, error_type, message = error.status, error.error_type, error.message
    elif isinstance(error, UpstreamTimeout):
        status, error_type, message = 504, "UpstreamTimeout", "AWS did not answer in time"
    elif isinstance(error, UpstreamUnreachable):
        status, error_type, message = 502, "UpstreamUnreachable", "AWS could not be reached"
    else:
        status, error_type, message = 500, "InternalError", "the extension failed; see its log"
    return status, json.dumps({"__type": error_type, "message": message}).encode("utf-8")


class Service:
    """What the HTTP handler serves: token check, routes, the store and the AWS clients."""

    ROUTES = {
        "/systemsmanager/parameters/get": parameter_fetch,
        "/systemsmanager/parameters/get/": parameter_fetch,
        "/secretsmanager/get": secret_fetch,
        "/secretsmanager/get/": secret_fetch,
    }

    def __init__(self, config, log, credentials, stats=None, clock=time.monotonic):
        self.config = config
        self.log = log
        self.stats = stats or Stats()
        self.token = (config.request_token or "").encode("utf-8")
        cache = TTLCache(config.cache_size, config.max_stale_seconds, clock)
        self.store = Store(cache, self.stats, log)
        cached = config.cache_enabled and config.cache_size > 0
        self.ttl = {"ssm": config.ssm_ttl if cached else 0,
                    "secretsmanager": config.secrets_ttl if cached else 0}
        self.clients = {
            "ssm": ServiceClient("ssm", config.ssm_endpoint, config.region, credentials,
                                 config.ssm_timeout_ms, config.max_connections, self.stats, log),
            "secretsmanager": ServiceClient("secretsmanager", config.secrets_endpoint, config.region,
                                            credentials, config.secrets_timeout_ms,
                                            config.max_connections, self.stats, log),
        }

    def token_matches(self, given):
        # Constant time over the content: a wrong last byte takes as long as a wrong first.
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), self.token)

    def get(self, fetch):
        """(body, cache state) for a parsed request, or raises UpstreamError."""
        client = self.clients[fetch.service]
        if fetch.service == "ssm":
            def call():
                return render_parameter(client.call(fetch.target, fetch.payload), fetch.selector)
        else:
            def call():
                return render_secret(client.call(fetch.target, fetch.payload))
        return self.store.get(fetch.key, call, self.ttl[fetch.service], fetch.refresh)

    def prefetch(self, entries):
        """Fill the cache with the configured entries; failures are WARNs, never fatal."""
        for entry in entries:
            kind, _, rest = entry.partition(":")
            ident, _, query = rest.partition("?")
            try:
                if kind == "ssm" and ident:
                    fetch = parameter_fetch([("name", ident)] + parse_query(query))
                elif kind == "secret" and ident:
                    fetch = secret_fetch([("secretId", ident)] + parse_query(query))
                else:
                    raise ClientError(400, "InvalidPrefetch", "expected ssm:<name>[?query] or secret:<id>[?query]")
                self.get(fetch)
                self.log.debug(f"prefetched {describe_key(fetch.key)}")
            except (ClientError, UpstreamError) as error:
                self.log.warn(f"prefetch of {entry[:200]!r} failed: {error}")


# ---------------------------------------------------------------------------
# HTTP handler and server
# ---------------------------------------------------------------------------

TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
CACHE_HEADER = "X-Parameters-Secrets-Cache"
PING_BODY = b'{"status": "ok"}'


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection. Every answer is written with one sendall (status line, headers and
    body together): with TCP_NODELAY that is one segment, and no delayed-ACK stall."""

    protocol_version = "HTTP/1.1"
    server_version = DEFAULT_NAME
    sys_version = ""

    def setup(self):
        self.timeout = self.server.read_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()  # StreamRequestHandler's plain reader: ours keeps a deadline
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        # Each request (line and headers) gets a deadline one read timeout away, checked
        # at every read: a caller dripping one byte at a time cannot hold a thread for ever.
        self.reader.deadline = time.monotonic() + self.timeout
        super().handle_one_request()

    def parse_request(self):
        if len(self.raw_requestline.split()) == 2:
            # HTTP/0.9 ("GET /"): http.server would go on to wait for headers that a 0.9
            # client never sends. Refuse at once and close.
            self.close_connection = True
            self._send(400, b'{"__type": "BadRequest", "message": "HTTP/0.9 is not served"}')
            return False
        return super().parse_request()

    def do_GET(self):
        service = self.server.service
        if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a GET with a body: do not parse the body as a request
        try:
            if "X-Forwarded-For" in self.headers:
                # A proxied request may be forged server-side (SSRF): refuse, as the Secrets
                # Manager Agent does. Lambda callers are on this host and never proxied.
                raise ClientError(400, "ForwardedRequestRefused", "requests with X-Forwarded-For are refused")
            path, _, query = self.path.partition("?")
            if path == "/ping":
                self._send(200, PING_BODY)
                return
            route = Service.ROUTES.get(path)
            if route is None:
                raise ClientError(404, "NotFound", "unknown path; use /systemsmanager/parameters/get "
                                                   "or /secretsmanager/get")
            given = self.headers.get(TOKEN_HEADER)
            if given is None:
                raise ClientError(401, "MissingToken", f"the header {TOKEN_HEADER} is required")
            if not service.token_matches(given):
                raise ClientError(403, "InvalidToken", f"the header {TOKEN_HEADER} does not match")
            fetch = route(parse_query(query))
            self.server.in_flight.change(+1)  # the stop waits for these to be answered
            try:
                body, state = service.get(fetch)
            finally:
                self.server.in_flight.change(-1)
            self._send(200, body, ((CACHE_HEADER, state),))
        except Exception as error:  # every failure is answered; the server keeps serving
            self._send_error(error)

    def _send_error(self, error):
        status, body = error_status_and_body(error)
        log = self.server.service.log
        if status >= 500 and not isinstance(error, UpstreamError):
            log.error(f"internal error: {type(error).__name__}")
        elif log.enabled("debug"):
            log.debug(f"{self.command} {self.path.partition('?')[0][:200]} -> {status} {error}")
        extra = (("Allow", "GET"),) if status == 405 else ()
        self._send(status, body, extra)

    def _send(self, status, body, extra_headers=()):
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                 "Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in extra_headers)
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _method_not_allowed(self):
        self.close_connection = True  # a body may follow that we do not read
        self._send_error(ClientError(405, "MethodNotAllowed", f"only GET is served, not {self.command[:16]}"))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, headers too long or too many,
        unsupported method), answered as JSON rather than HTML; the connection closes."""
        self.close_connection = True
        if code == 501:  # http.server's answer to a method it has no do_ for
            code, error_type = 405, "MethodNotAllowed"
        else:
            error_type = {414: "RequestLineTooLong", 431: "HeadersTooLarge", 505: "HTTPVersionNotSupported",
                          408: "RequestTimeout"}.get(code, "BadRequest")
        text = self.responses.get(code, ("error",))[0]
        try:
            self._send(code, json.dumps({"__type": error_type, "message": text}).encode("utf-8"),
                       (("Allow", "GET"),) if code == 405 else ())
        except OSError:
            pass
        self.server.service.log.debug(f"refused a malformed request: {code} {text}")

    def log_message(self, format, *args):
        # http.server's access and error lines may quote the request: debug level only,
        # and the token never appears there (it is a header, not part of the request line).
        log = self.server.service.log
        if log.enabled("debug"):
            log.debug("http: " + (format % args)[:300])


class DeadlineReader(socket.SocketIO):
    """A socket reader that also gives up at a deadline, not only after a silence.

    The socket keeps its read timeout (a silent peer is dropped after it); each read
    also checks the deadline, so a peer dripping bytes is dropped at the first read past
    it: within twice the read timeout at worst. Cheaper than a settimeout() per read,
    which is a system call."""

    def __init__(self, sock):
        super().__init__(sock, "rb")
        self.deadline = None

    def readinto(self, buffer):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise socket.timeout("the request did not arrive in time")
        return super().readinto(buffer)


TOO_MANY_BODY = b'{"__type": "TooManyConnections", "message": "too many connections at once; retry"}'
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(TOO_MANY_BODY), TOO_MANY_BODY))


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most max_clients at once (over that: 429 and close),
    listening on one loopback address. Threads are daemons: an idle keep-alive
    connection never holds up the exit."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, family, service, slots, in_flight):
        self.address_family = family
        self.service = service
        self.slots = slots                  # shared by the IPv4 and IPv6 listeners
        self.in_flight = in_flight          # shared counter of requests being answered
        self.read_timeout = service.config.read_timeout_ms / 1000.0
        super().__init__(address, Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Skip HTTPServer.server_bind: it looks up the host name (socket.getfqdn), which
        # costs start-up time and may wait on DNS; we never need it.
        socket.socket.setsockopt(self.socket, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "localhost", self.server_address[1]

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                try:
                    request.recv(65536)  # drain what was sent, so close() does not reset
                except OSError:
                    pass
                request.sendall(TOO_MANY_CONNECTIONS)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        # A failure inside a connection (reset by the peer, a bug): one line, no traceback
        # that could quote request data, and the server goes on serving.
        error = sys.exc_info()[1]
        self.service.log.debug(f"connection ended with {type(error).__name__}")


class Gauge:
    """A count of requests being answered, for the stop to wait on. A plain lock, not a
    Condition: it is taken twice per request, and the stop can afford to poll."""

    def __init__(self):
        self.value = 0
        self.lock = threading.Lock()

    def change(self, delta):
        with self.lock:
            self.value += delta

    def wait_zero(self, timeout, clock=time.monotonic):
        deadline = clock() + timeout
        while self.value:
            if clock() >= deadline:
                return False
            time.sleep(0.01)
        return True


class PortInUse(Exception):
    pass


class Listener:
    """The servers on 127.0.0.1 and (where the host has it) ::1, each in its own thread."""

    def __init__(self, service, port):
        self.service = service
        slots = threading.BoundedSemaphore(service.config.max_clients)
        self.in_flight = Gauge()
        self.servers = []
        try:
            self.servers.append(Server(("127.0.0.1", port), socket.AF_INET, service, slots, self.in_flight))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} on 127.0.0.1 is already in use")
            raise
        # `localhost` may resolve to ::1 first; answering there spares callers a refused
        # first attempt. No IPv6 on the host is fine.
        if socket.has_ipv6:
            try:
                self.servers.append(Server(("::1", port, 0, 0), socket.AF_INET6, service, slots, self.in_flight))
            except OSError as error:
                service.log.debug(f"not listening on [::1]:{port} ({error.strerror})")

    def start(self):
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"listen-{server.server_address[0]}", daemon=True)
            thread.start()
        for server in self.servers:
            host = server.server_address[0]
            shown = f"[{host}]" if ":" in host else host
            self.service.log.info(f"listening on {shown}:{server.server_address[1]}")

    def stop(self, grace):
        """Stop accepting, then let requests in flight finish within grace seconds."""
        # shutdown() waits for the serve loop's next poll: stop all listeners at once.
        stoppers = [threading.Thread(target=server.shutdown) for server in self.servers]
        for stopper in stoppers:
            stopper.start()
        for stopper, server in zip(stoppers, self.servers):
            stopper.join()
            server.server_close()
        if not self.in_flight.wait_zero(grace):
            self.service.log.warn("stopping with requests still in flight")


# ---------------------------------------------------------------------------
# Lambda lifecycle: the Extensions API
# ---------------------------------------------------------------------------

class ExtensionsApiError(Exception):
    """The Extensions API refused a call (403 with errorType) or could not be reached."""


class ExtensionsApi:
    """The calls an external extension makes, over the standard library's HTTP client:
    Lambda's minimal images do not promise curl, and a process per event would compete
    for the function's small CPU share."""

    def __init__(self, runtime_api):
        host, _, port = runtime_api.rpartition(":")
        self.host, self.port = (host, int(port)) if host else (runtime_api, 80)
        self.identifier = None

    def _call(self, method, path, headers, body=None, timeout=None):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, "/2020-01-01/extension" + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise ExtensionsApiError(f"{method} {path}: Extensions API unreachable ({type(error).__name__})")
        finally:
            connection.close()
        if response.status >= 300:
            try:
                error_type = json.loads(data).get("errorType", "unknown")
            except (ValueError, AttributeError):
                error_type = "unknown"
            raise ExtensionsApiError(f"{method} {path}: {response.status} {error_type}")
        return response, data

    def register(self, name):
        response, data = self._call("POST", "/register", {"Lambda-Extension-Name": name,
                                                          "Content-Type": "application/json"},
                                    json.dumps({"events": ["INVOKE", "SHUTDOWN"]}), timeout=10)
        self.identifier = response.getheader("Lambda-Extension-Identifier")
        if not self.identifier:
            raise ExtensionsApiError("POST /register: no Lambda-Extension-Identifier in the answer")
        return json.loads(data or b"{}")

    def next_event(self):
        # No timeout: the call blocks until Lambda has an event, however long that is.
        _, data = self._call("GET", "/event/next", {"Lambda-Extension-Identifier": self.identifier})
        return json.loads(data)

    def report_error(self, phase, error_type, message):
        """POST /init/error or /exit/error; Lambda ends the environment after it."""
        body = json.dumps({"errorMessage": message, "errorType": error_type, "stackTrace": []})
        self._call("POST", f"/{phase}/error", {"Lambda-Extension-Identifier": self.identifier,
                                               "Lambda-Extension-Function-Error-Type": error_type,
                                               "Content-Type": "application/json"}, body, timeout=5)


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

class Stop(Exception):
    """Raised in the main thread by SIGTERM / SIGINT."""


def _raise_stop(signum, frame):
    # Once stopping, further signals are ignored: a second SIGTERM must not interrupt
    # the orderly stop that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def start_up(config, log):
    """Everything that can fail before serving: returns (service, listener) or raises
    Fatal with the Lambda error type that names the cause."""
    if not config.request_token:
        raise Fatal("Extension.NoToken", "no request token: AWS_SESSION_TOKEN is not set (Lambda sets it); "
                                         "for local runs set AWS_TOKEN to the token callers will send")
    if not config.region:
        raise Fatal("Extension.NoRegion", "no region: looked for AWS_REGION and AWS_DEFAULT_REGION")
    if config.endpoint_error:
        raise Fatal("Extension.ConfigInvalid", config.endpoint_error)
    credentials = CredentialProvider(config, log)
    try:
        credentials.resolve()
    except CredentialsError as error:
        raise Fatal("Extension.NoCredentials", str(error))
    service = Service(config, log, credentials)
    try:
        listener = Listener(service, config.port)
    except PortInUse as error:
        raise Fatal("Extension.PortInUse", str(error))
    return service, listener


class Fatal(Exception):
    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type


def report_summary(service, name, config, log):
    counts = service.stats.snapshot()
    log.info("summary: " + " ".join(f"{key}={counts[key]}" for key in Stats.NAMES))
    if config.metrics == "emf":
        names = {"hits": "Hits", "misses": "Misses", "aws_calls": "AwsCalls", "errors": "Errors",
                 "stale": "StaleAnswers"}
        record = {"_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [{
            "Namespace": "ParametersSecretsExtension", "Dimensions": [["ExtensionName"]],
            "Metrics": [{"Name": metric, "Unit": "Count"} for metric in names.values()]}]},
            "ExtensionName": name}
        record.update({names[key]: counts[key] for key in Stats.NAMES})
        # Printed as is (not through the logger): CloudWatch recognises an EMF record
        # only when the line is the JSON object itself.
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def main(argv):
    name = argv[1] if len(argv) > 1 else DEFAULT_NAME
    config, messages = load_config(os.environ)
    log = Logger(name, config.log_level, config.log_format)
    for level, message in messages:
        log.log(level, message)
    log.debug(f"configuration: {config}")

    # Signals go to the main thread only: block them before any thread starts (threads
    # inherit the mask), unblock here once they exist. Otherwise the kernel may deliver
    # SIGTERM to a worker and the main thread sleeps on (pitfalls.md).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)

    api = ExtensionsApi(config.lambda_runtime_api) if config.lambda_runtime_api else None
    service = listener = None
    fatal = None
    try:
        service, listener = start_up(config, log)
        listener.start()  # accepting before /register: the function's init code can fetch
        if config.prefetch:  # started while signals are still blocked, like every thread
            threading.Thread(target=service.prefetch, args=(config.prefetch,), daemon=True).start()
    except Fatal as error:
        fatal = error

    try:
        # A SIGTERM that came during start-up is delivered right here, inside the try.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        if api is not None:
            return run_in_lambda(api, name, config, log, service, listener, fatal)
        if fatal is not None:
            log.error(str(fatal))
            return 2
        while True:
            time.sleep(3600)  # the signal handler raises Stop here
    except Stop as stop:
        log.info(f"{stop}: stopping")
    if listener is not None:
        listener.stop(grace=5.0)
        report_summary(service, name, config, log)
    return 0


def run_in_lambda(api, name, config, log, service, listener, fatal):
    try:
        info = api.register(name)
        log.debug(f"registered for function {info.get('functionName')!r}")
        if fatal is not None:
            log.error(str(fatal))
            api.report_error("init", fatal.error_type, str(fatal))
            return 2
        while True:
            event = api.next_event()
            if str(event.get("eventType", "")).upper() == "SHUTDOWN":
                break
        reason = event.get("shutdownReason", "unknown")
        deadline_ms = event.get("deadlineMs")
        grace = 1.0
        if isinstance(deadline_ms, (int, float)):
            # Leave a margin before Lambda's SIGKILL for the summary and the exit.
            grace = max(0.0, min(grace, deadline_ms / 1000.0 - time.time() - 0.3))
        log.info(f"shutdown ({reason}): stopping")
        listener.stop(grace)
        report_summary(service, name, config, log)
        return 0
    except Stop as stop:
        log.info(f"{stop}: stopping")
        if listener is not None:
            listener.stop(grace=0.5)
            report_summary(service, name, config, log)
        return 0
    except ExtensionsApiError as error:
        log.error(str(error))
        return 1
    except Exception as error:  # a bug: tell Lambda, then end
        log.error(f"fatal: {type(error).__name__}")
        try:
            api.report_error("exit", "Extension.Crash", type(error).__name__)
        except ExtensionsApiError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
