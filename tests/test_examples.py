"""examples/: the SAM template is valid and complete, and the example function works
against the real extension.

* cfn-lint (pinned in requirements-dev.txt; it includes the SAM transform, so it checks
  the template as CloudFormation will see it after the transform) reports no error and
  no warning. A deliberately broken copy is linted too, so that a linter that silently
  checks nothing cannot pass this test.
* The template holds what a deployment needs: the layer from build_layer.sh's zip, runtimes
  python3.9-3.13, both architectures, the parameter, the secret, the function's IAM
  permissions (kms:Decrypt only through SSM) and outputs.
* examples/function/app.py, imported with the environment the template gives the
  function (its PREFETCH value included), reads the parameter and the secret through
  a running extension (moto behind it) with the documented urllib pattern on
  ``localhost``.
"""

import importlib.util
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

import extension
from conftest import ROOT, free_port, wait_for

SSM_MULTI = "AmazonSSM.GetParameters"
SM_BATCH = "secretsmanager.BatchGetSecretValue"

EXAMPLES = ROOT / "examples"
TEMPLATE = EXAMPLES / "template.yaml"
APP = EXAMPLES / "function" / "app.py"
RUNTIMES = ["python3.9", "python3.10", "python3.11", "python3.12", "python3.13"]


def _lint(path):
    from cfnlint.api import lint_file

    return lint_file(Path(path))


def _load_template():
    from cfnlint.decode import decode

    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return template


def _resources(template, type_):
    return {name: r for name, r in template["Resources"].items() if r["Type"] == type_}


def _one(template, type_):
    found = _resources(template, type_)
    assert len(found) == 1, (type_, list(found))
    return next(iter(found.items()))


# ------------------------------------------------------------------ the template


def test_template_passes_cfn_lint():
    matches = _lint(TEMPLATE)
    serious = [m for m in matches if m.rule.id[0] in "EW"]
    assert serious == [], "\n".join(str(m) for m in serious)


def test_cfn_lint_catches_a_broken_template(tmp_path):
    text = TEMPLATE.read_text()
    broken = text.replace("Handler: app.lambda_handler",
                          "Handler: app.lambda_handler\n      NoSuchProperty: 1", 1)
    broken = broken.replace("Type: AWS::SSM::Parameter", "Type: AWS::SSM::Parametr", 1)
    assert broken != text
    path = tmp_path / "template.yaml"
    path.write_text(broken)
    ids = {m.rule.id for m in _lint(path)}
    # cfn-lint 1.58 names both faults (E3002 unknown property, E3006 unknown type); the
    # release pinned for Python 3.9 stops at the SAM transform (E0001). Either is an error.
    assert {"E3002", "E3006"} <= ids or ids == {"E0001"}, ids


def test_template_publishes_the_built_layer(tmp_path):
    template = _load_template()
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    name, layer = _one(template, "AWS::Serverless::LayerVersion")
    props = layer["Properties"]
    assert props["CompatibleRuntimes"] == RUNTIMES
    assert sorted(props["CompatibleArchitectures"]) == ["arm64", "x86_64"]
    content = (TEMPLATE.parent / props["ContentUri"]).resolve()
    # The version is written into the path (SAM packages ContentUri as written, without
    # substitutions): the one in extension.py, and in the layer's description.
    version = extension.__version__
    assert content == (ROOT / "dist" / f"parameters-secrets-extension-{version}-layer.zip").resolve()
    assert props["Description"].endswith(f" {version}")

    # It is the file build_layer.sh writes (built here into a temporary directory).
    result = subprocess.run(["sh", str(ROOT / "build_layer.sh"), "-o", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    built = Path(result.stdout.strip().splitlines()[-1])
    assert built.name == content.name, (built, content)
    assert built.is_file() and zipfile.is_zipfile(built)

    # The function uses that layer.
    _, function = _one(template, "AWS::Serverless::Function")
    assert {"Ref": name} in function["Properties"]["Layers"]


def test_template_parameter_secret_function_and_outputs():
    template = _load_template()
    pname, parameter = _one(template, "AWS::SSM::Parameter")
    assert parameter["Properties"]["Type"] == "String"
    sname, secret = _one(template, "AWS::SecretsManager::Secret")
    assert "GenerateSecretString" in secret["Properties"]
    assert "SecretString" not in secret["Properties"]  # no secret in the template

    fname, function = _one(template, "AWS::Serverless::Function")
    props = function["Properties"]
    assert props["Handler"] == "app.lambda_handler"
    assert props["CodeUri"].rstrip("/") == "function"
    assert props["Runtime"] in RUNTIMES
    assert props["Architectures"] == [{"Ref": "Architecture"}]
    assert sorted(template["Parameters"]["Architecture"]["AllowedValues"]) == ["arm64", "x86_64"]
    env = props["Environment"]["Variables"]
    assert env["PARAMETER_NAME"] == {"Ref": pname}
    assert env["SECRET_ID"] == {"Ref": sname}
    # The function code reads exactly these variables.
    code = APP.read_text()
    assert 'os.environ["PARAMETER_NAME"]' in code and 'os.environ["SECRET_ID"]' in code

    statements = [s for policy in props["Policies"] for s in policy["Statement"]]
    by_action = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            by_action[action] = statement
    assert set(by_action) == {"ssm:GetParameter", "ssm:GetParameters", "secretsmanager:GetSecretValue",
                              "secretsmanager:BatchGetSecretValue", "kms:Decrypt"}
    # Least privilege: the one parameter, the one secret, KMS only through SSM; the
    # batch actions (prefetch in one call) on the same resources, BatchGetSecretValue
    # on none (it answers only what GetSecretValue allows).
    ssm_resource = by_action["ssm:GetParameter"]["Resource"]
    assert by_action["ssm:GetParameters"]["Resource"] == ssm_resource
    assert "Fn::Sub" in ssm_resource and ":parameter${ParameterName}" in ssm_resource["Fn::Sub"]
    assert parameter["Properties"]["Name"] == {"Ref": "ParameterName"}
    assert by_action["secretsmanager:GetSecretValue"]["Resource"] == {"Ref": sname}
    assert by_action["secretsmanager:BatchGetSecretValue"]["Resource"] == "*"
    kms = by_action["kms:Decrypt"]
    assert kms["Resource"] != "*"
    via = kms["Condition"]["StringEquals"]["kms:ViaService"]
    assert via == {"Fn::Sub": "ssm.${AWS::Region}.${AWS::URLSuffix}"}

    outputs = template["Outputs"]
    values = [o["Value"] for o in outputs.values()]
    for resource in (fname, pname, sname):
        assert {"Ref": resource} in values, (resource, values)
    layer_name, _ = _one(template, "AWS::Serverless::LayerVersion")
    assert {"Ref": layer_name} in values


def test_readme_explains_build_deploy_invoke():
    text = (EXAMPLES / "README.md").read_text()
    for needle in ("build_layer.sh", "sam deploy --guided", "aws lambda invoke",
                   "sam delete", "PARAMETERS_SECRETS_EXTENSION_PREFETCH"):
        assert needle in text, needle


# ---------------------------------------------------------- the function, for real


def _function_environment(template, parameter_name, secret_arn):
    """The function's environment variables as CloudFormation would resolve them for
    the given parameter name and secret ARN (only the intrinsics the template uses)."""
    resolved = {"ParameterName": parameter_name}
    for name, resource in template["Resources"].items():
        if resource["Type"] == "AWS::SSM::Parameter":
            resolved[name] = parameter_name  # Ref of a parameter: its name
        elif resource["Type"] == "AWS::SecretsManager::Secret":
            resolved[name] = secret_arn  # Ref of a secret: its ARN

    def resolve(value):
        if isinstance(value, str):
            return value
        if "Ref" in value:
            return resolved[value["Ref"]]
        if "Fn::Sub" in value:
            return re.sub(r"\$\{([^}]+)\}", lambda m: resolved[m.group(1)], value["Fn::Sub"])
        raise AssertionError(f"unexpected intrinsic in the function environment: {value!r}")

    _, function = _one(template, "AWS::Serverless::Function")
    return {k: resolve(v) for k, v in function["Properties"]["Environment"]["Variables"].items()}


def _import_app(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("example_app_under_test", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_function_against_the_extension(moto, ssm, secretsmanager, counting_proxy,
                                                start_extension, monkeypatch):
    template = _load_template()
    parameter_name = template["Parameters"]["ParameterName"]["Default"]
    ssm.put_parameter(Name=parameter_name, Value="hello from Parameter Store", Type="String")
    secret_arn = secretsmanager.create_secret(
        Name="ExampleDatabaseSecret",
        SecretString=json.dumps({"username": "app", "password": "pw-not-to-be-returned"}),
    )["ARN"]
    env = _function_environment(template, parameter_name, secret_arn)
    proxy = counting_proxy(moto)
    # The extension gets the function's environment, as in Lambda (the PREFETCH and
    # METRICS values of the template included).
    ext = start_extension(proxy.url, env=env)
    # The template prefetches both, each in a batch call of one: wait until both are
    # cached (a request that comes while a call is in flight joins it: no call of its own).
    wait_for(lambda: proxy.count(SSM_MULTI) == 1 and proxy.count(SM_BATCH) == 1,
             message="the template's prefetch calls")
    for path in (f"/systemsmanager/parameters/get?name={parameter_name}&withDecryption=true",
                 f"/secretsmanager/get?secretId={secret_arn}"):
        wait_for(lambda path=path: ext.get(path)[1].get("X-Parameters-Secrets-Cache") == "hit",
                 message="the prefetched value cached")
    assert proxy.count() == 2
    app = _import_app(monkeypatch, dict(
        env, PARAMETERS_SECRETS_EXTENSION_HTTP_PORT=str(ext.port),
        AWS_SESSION_TOKEN=ext.token))

    result = app.lambda_handler({}, None)
    assert result["parameter"]["name"] == parameter_name
    assert result["parameter"]["value"] == "hello from Parameter Store"
    assert result["parameter"]["version"] == 1
    assert result["secret"]["keys"] == ["password", "username"]
    assert result["secret"]["versionStages"] == ["AWSCURRENT"]
    assert "pw-not-to-be-returned" not in json.dumps(result)
    assert result["parameter"]["cache"] == "hit" and result["secret"]["cache"] == "hit"
    # A second invocation is served from the cache: no AWS call.
    again = app.lambda_handler({}, None)
    assert again["parameter"]["cache"] == "hit" and again["secret"]["cache"] == "hit"
    assert proxy.count() == 2
    assert "pw-not-to-be-returned" not in ext.logs()

    # A missing parameter: a clear error from the extension, no secret in it.
    monkeypatch.setenv("PARAMETER_NAME", "/example/does-not-exist")
    with pytest.raises(app.ExtensionError) as info:
        app.lambda_handler({}, None)
    assert "ParameterNotFound" in str(info.value)

    # The metrics line the template asks for appears at shutdown.
    assert ext.stop() == 0, ext.stderr()
    assert '"ParametersSecretsExtension"' in ext.logs()


def test_example_function_with_wrong_token_fails_clearly(moto, start_extension, monkeypatch):
    ext = start_extension(moto)
    app = _import_app(monkeypatch, {
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(ext.port),
        "AWS_SESSION_TOKEN": "not-the-token",
        "PARAMETER_NAME": "x", "SECRET_ID": "y"})
    with pytest.raises(app.ExtensionError) as info:
        app.lambda_handler({}, None)
    assert "HTTP 403" in str(info.value)
    assert "InvalidToken" in str(info.value)


def test_example_in_a_fake_lambda_environment(moto, ssm, secretsmanager, counting_proxy,
                                              tmp_path):
    """The whole example as Lambda runs it: the layer built by build_layer.sh, unpacked
    into /opt and started through its bootstrap by tests/fake_lambda.py (the Extensions
    and Runtime API), the function's environment from the template, app.py as the
    handler. The template prefetches, so even the first invocation is a cache hit; at
    SHUTDOWN come the summary and the EMF line."""
    from fake_lambda import LambdaEnvironment

    template = _load_template()
    parameter_name = template["Parameters"]["ParameterName"]["Default"]
    ssm.put_parameter(Name=parameter_name, Value="hello from Parameter Store", Type="String")
    secret_arn = secretsmanager.create_secret(
        Name="ExampleDatabaseSecret",
        SecretString=json.dumps({"username": "app", "password": "pw-in-lambda"}))["ARN"]
    proxy = counting_proxy(moto)

    result = subprocess.run(["sh", str(ROOT / "build_layer.sh"), "-o", str(tmp_path / "dist")],
                            capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    layer = result.stdout.strip().splitlines()[-1]

    env = _function_environment(template, parameter_name, secret_arn)
    env.update({
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "ASIAEXAMPLEFUNCTION",
        "AWS_SECRET_ACCESS_KEY": "function-secret-key",
        "AWS_SESSION_TOKEN": "function-session-token",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(free_port()),
    })
    with LambdaEnvironment(layer, tmp_path / "lambda", env, {"app.py": APP.read_text()},
                           handler="app.lambda_handler") as lam:
        init = lam.start()
        assert init.ok, (init, lam.logs())
        wait_for(lambda: proxy.count(SSM_MULTI) == 1 and proxy.count(SM_BATCH) == 1,
                 message="the template's prefetch calls")
        first = lam.invoke({})
        assert first.status == "success", (first, lam.logs())
        payload = first.payload
        assert payload["parameter"]["value"] == "hello from Parameter Store"
        assert payload["secret"]["keys"] == ["password", "username"]
        second = lam.invoke({})
        assert second.status == "success", (second, lam.logs())
        assert second.payload["parameter"]["cache"] == "hit"
        assert second.payload["secret"]["cache"] == "hit"
        assert proxy.count() == 2  # the prefetch calls only
        shutdown = lam.shutdown("spindown")
        assert not shutdown.killed, (shutdown, lam.logs())
        logs = lam.logs()
    assert lam.crashes == [] and lam.init_errors == [], (lam.crashes, lam.init_errors)
    assert "pw-in-lambda" not in logs and "function-session-token" not in logs
    # JSON log lines (AWS_LAMBDA_LOG_FORMAT=JSON) with the summary, then the EMF line.
    objects = []
    for line in logs.splitlines():
        if line.startswith("{"):
            objects.append(json.loads(line))
    summaries = [o for o in objects if "summary:" in o.get("message", "")]
    assert len(summaries) == 1 and summaries[0]["level"] == "INFO", objects
    emf = [o for o in objects if "_aws" in o]
    assert len(emf) == 1, objects
    assert emf[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "ParametersSecretsExtension"
    assert emf[0]["AwsCalls"] == 2
    assert emf[0]["Hits"] >= 2
