"""Example Lambda function: read one SSM parameter and one secret through the extension.

It uses only the standard library, exactly as AWS documents for its own Parameters and
Secrets Lambda Extension (urllib.request, header X-Aws-Parameters-Secrets-Token), so
code written for the AWS layer works unchanged with this one.

Environment (set by ../template.yaml):
    PARAMETER_NAME  name of the SSM parameter to read
    SECRET_ID       name or ARN of the Secrets Manager secret to read
    PARAMETERS_SECRETS_EXTENSION_HTTP_PORT  the extension's port (default 2773)

The handler never returns or logs the secret's value: it reports which keys the secret
holds and whether each answer came from the extension's cache.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

PORT = os.environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", "2773")
ENDPOINT = "http://localhost:" + PORT

# Lambda gives every function AWS_SESSION_TOKEN; the extension expects it in the
# X-Aws-Parameters-Secrets-Token header. With SnapStart / container credentials there
# is no AWS_SESSION_TOKEN and the extension expects AWS_CONTAINER_AUTHORIZATION_TOKEN.
TOKEN = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get(
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", ""
)


class ExtensionError(Exception):
    """The extension answered with an error (its JSON body holds no secret value)."""


def _get(path, query):
    """GET ENDPOINT + path?query from the extension; return (parsed body, cache status)."""
    url = ENDPOINT + path + "?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(url)
    req.add_header("X-Aws-Parameters-Secrets-Token", TOKEN)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = json.loads(resp.read())
            return body, resp.headers.get("X-Parameters-Secrets-Cache")
    except urllib.error.HTTPError as err:
        # Error bodies are {"__type": ..., "message": ...}: safe to report.
        detail = err.read().decode("utf-8", "replace")
        raise ExtensionError(f"{path} {query}: HTTP {err.code} {detail}") from None


def get_parameter(name, with_decryption=True):
    """The Parameter object ({"Name", "Type", "Value", "Version", ...}) for ``name``.

    withDecryption=true returns the plain text of a SecureString (and does no harm for
    a String); it needs kms:Decrypt, which the template grants through SSM only.
    """
    body, cache = _get(
        "/systemsmanager/parameters/get",
        {"name": name, "withDecryption": "true" if with_decryption else "false"},
    )
    return body["Parameter"], cache


def get_secret(secret_id):
    """The GetSecretValue result ({"Name", "SecretString", "VersionId", ...})."""
    return _get("/secretsmanager/get", {"secretId": secret_id})


def lambda_handler(event, context):
    parameter, parameter_cache = get_parameter(os.environ["PARAMETER_NAME"])
    secret, secret_cache = get_secret(os.environ["SECRET_ID"])
    secret_fields = json.loads(secret["SecretString"] or "{}")
    # Here the function would connect to its database with secret_fields["password"].
    return {
        "parameter": {
            "name": parameter["Name"],
            "value": parameter["Value"],
            "version": parameter["Version"],
            "cache": parameter_cache,
        },
        "secret": {
            "name": secret["Name"],
            "keys": sorted(secret_fields),
            "versionStages": secret["VersionStages"],
            "cache": secret_cache,
        },
    }
