"""No secret value, request token or secret key ever appears in the extension's output.

Runs the real extension at PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL=debug against moto,
fetches planted values (a SecureString with and without decryption, a string secret,
a binary secret, a Secrets Manager reference), provokes errors (missing and wrong
token, not found, bad query), stops it, then searches all of stdout and stderr.

Source of the rule: README.md (the extension never logs or echoes a secret value, a
parameter value or a token, at any level; error bodies included). docs/pitfalls.md:
moto's undecrypted SecureString value is "kms:alias/aws/ssm:<plaintext>", so it
contains the plaintext and must not be logged either.
"""

import base64
import json
import secrets
import urllib.parse

import pytest

PARAMS = "/systemsmanager/parameters/get"
SECRETS = "/secretsmanager/get"


def enc(value):
    return urllib.parse.quote(value, safe="")


@pytest.fixture
def planted(moto, ssm, secretsmanager):
    """Distinctive random values planted in moto; returns them and their names."""
    tag = secrets.token_hex(8)
    values = {
        "secure": f"LEAKSECURE{tag}",
        "secret_old": f"LEAKOLD{tag}",
        "secret": f"LEAKSTRING{tag}",
        "binary": f"LEAKBINARY{tag}".encode(),
        "ref": f"LEAKREF{tag}",
    }
    ssm.put_parameter(Name="/leak/secure", Value=values["secure"], Type="SecureString")
    secretsmanager.create_secret(Name="leak/string", SecretString=values["secret_old"])
    secretsmanager.put_secret_value(SecretId="leak/string", SecretString=values["secret"])
    secretsmanager.create_secret(Name="leak/binary", SecretBinary=values["binary"])
    secretsmanager.create_secret(Name="leak/ref", SecretString=values["ref"])
    needles = [values["secure"], values["secret_old"], values["secret"], values["ref"],
               values["binary"].decode(), base64.b64encode(values["binary"]).decode()]
    return needles


SUCCESS_PATHS = [
    PARAMS + "?name=" + enc("/leak/secure") + "&withDecryption=true",
    PARAMS + "?name=" + enc("/leak/secure") + "&withDecryption=false",
    PARAMS + "?name=" + enc("/leak/secure"),
    SECRETS + "?secretId=" + enc("leak/string"),
    SECRETS + "?secretId=" + enc("leak/string") + "&versionStage=AWSPREVIOUS",
    SECRETS + "?secretId=" + enc("leak/binary"),
    PARAMS + "?name=" + enc("/aws/reference/secretsmanager/leak/ref") + "&withDecryption=true",
]

# (path, status): AWS's errors with moto's statuses, then the extension's own refusals.
ERROR_PATHS = [
    (PARAMS + "?name=" + enc("/leak/missing"), 400),                          # ParameterNotFound
    (SECRETS + "?secretId=" + enc("leak/missing"), 404),                      # ResourceNotFound
    (PARAMS + "?name=" + enc("/aws/reference/secretsmanager/leak/ref"), 400),  # needs decryption
    (PARAMS + "?name=" + enc("/leak/secure") + "&withdecryption=true", 400),  # key typo
    (PARAMS + "?name=%ZZ", 400),                                              # MalformedQuery
    ("/no/such/route", 404),
]

VARIANTS = {
    # The default start-up: the request token is AWS_SESSION_TOKEN.
    "text": {},
    # A separate request token (AWS_TOKEN) next to a credentials session token,
    # JSON logs, EMF metrics at shutdown, and a prefetch of the planted items so that
    # the background path is searched too.
    "json-emf-prefetch": {
        "AWS_TOKEN": "REQTOKEN" + secrets.token_hex(12),
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "PARAMETERS_SECRETS_EXTENSION_METRICS": "emf",
        "PARAMETERS_SECRETS_EXTENSION_PREFETCH": (
            "ssm:/leak/secure?withDecryption=true,secret:leak/string,secret:leak/binary"
        ),
    },
    # Caching off: every read goes upstream and through the fetch path's logging.
    "no-cache": {"PARAMETERS_SECRETS_EXTENSION_CACHE_ENABLED": "FALSE"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_secret_token_or_key_in_output(moto, planted, start_extension, variant):
    secret_key = "SECRETKEY" + secrets.token_hex(16)
    session_token = "SESSIONTOKEN" + secrets.token_hex(16)
    env = {
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
        "AWS_ACCESS_KEY_ID": "AKIDLEAKTEST",
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_SESSION_TOKEN": session_token,
    }
    env.update(VARIANTS[variant])
    ext = start_extension(moto, env=env)
    token = ext.token
    assert token == env.get("AWS_TOKEN", session_token)
    wrong_token = "WRONGTOKEN" + secrets.token_hex(12)

    bodies = []
    for path in SUCCESS_PATHS:
        for _ in range(2):  # a miss and (caching on) a hit
            status, _, body = ext.get(path)
            assert status == 200, (path, body)
            bodies.append(body)
    error_bodies = []
    for path, expected in ERROR_PATHS:
        status, _, body = ext.get(path)
        assert status == expected, (path, body)
        error_bodies.append(body)
    for path in SUCCESS_PATHS[:1] + SUCCESS_PATHS[3:4]:
        for tok in (None, wrong_token, token + "x", token[:-1]):
            status, _, body = ext.get(path, token=tok)
            # No header: 401 MissingToken; a wrong one: 403 InvalidToken (README.md).
            assert status == (401 if tok is None else 403), (path, body)
            error_bodies.append(body)

    # The planted values did come through the extension (so the search means something).
    joined = b"".join(bodies).decode()
    for needle in planted:
        if needle.startswith("LEAKBINARY"):
            continue  # delivered base64-encoded (the next needle)
        assert needle in joined, needle

    code = ext.stop()
    assert code == 0
    output = ext.logs()
    # The debug level was really on: otherwise "nothing leaked" proves little.
    assert "debug" in output.lower(), output[-2000:]

    forbidden = {
        "request token": token,
        "session token": session_token,
        "secret access key": secret_key,
        "wrong token sent by a caller": wrong_token,
    }
    for i, needle in enumerate(planted):
        forbidden[f"planted value #{i}"] = needle
    for what, needle in forbidden.items():
        assert needle not in output, f"{what} appears in the extension's output"

    for body in error_bodies:
        text = body.decode("utf-8", "replace")
        json.loads(text)
        for what in ("request token", "session token", "secret access key",
                     "wrong token sent by a caller"):
            assert forbidden[what] not in text, f"{what} appears in an error body: {text}"
        for needle in planted:
            assert needle not in text, f"a planted value appears in an error body: {text}"
