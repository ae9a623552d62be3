"""extension.py runs on every Python that Lambda offers (3.9 onwards, docs/pitfalls.md): the
real extension, started with each Python 3.9+ interpreter this machine has, serves a
parameter and a secret from moto and stops cleanly on SIGTERM.

Interpreters are looked for as python3.9 ... python3.14 on PATH and under pyenv's
versions folder; those absent are skipped (the static check with vermin in
test_stdlib_only.py covers the floor everywhere)."""

import glob
import os
import shutil
import subprocess

import pytest

MINORS = range(9, 15)


def interpreters():
    found = {}
    candidates = [shutil.which(f"python3.{minor}") for minor in MINORS]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python3")))
    for path in filter(None, candidates):
        try:
            version = subprocess.run([path, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version and tuple(map(int, version.split("."))) >= (3, 9) and version not in found:
            found[version] = path
    return found


FOUND = interpreters()


@pytest.mark.parametrize("version", sorted(FOUND) or ["none"])
def test_extension_serves_on_this_python(version, moto, ssm, secretsmanager, start_extension):
    if version == "none":
        pytest.skip("no Python 3.9+ interpreter besides the test runner's was found")
    ssm.put_parameter(Name="/versions/param", Value="on every python", Type="SecureString")
    secretsmanager.create_secret(Name="versions/secret", SecretString="secret on every python")
    ext = start_extension(moto, python=FOUND[version])
    status, _, body = ext.get("/systemsmanager/parameters/get?name=%2Fversions%2Fparam&withDecryption=true")
    assert status == 200, body
    assert b'"Value": "on every python"' in body
    status, _, body = ext.get("/secretsmanager/get?secretId=versions%2Fsecret")
    assert status == 200, body
    assert b'"SecretString": "secret on every python"' in body
    assert ext.stop() == 0, ext.logs()

