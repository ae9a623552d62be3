#!/usr/bin/env python3
"""Optional: cold starts in AWS's Runtime Interface Emulator (RIE), the real lifecycle.

    python3 bench/rie.py --rie PATH/aws-lambda-rie [--runs 18] [--layer dist/...zip]

Not part of the tests and not needed by anything else: the RIE is not in the project.
It measures the INIT duration the emulator reports (its `INIT REPORT(durationMs: ...)`
line; the REPORT line's "Init Duration" is not it) for three contents of /opt, in
interleaved runs: nothing, the layer, and the plainest Python extension
(bench/minimal_extension.py behind a sh launcher), with a trivial Python runtime. It
prints the medians and the INIT each extension adds (INIT minus INIT with nothing).

Needs: root (each run mounts /opt read-only in a private mount namespace, with
`unshare -m`, as Lambda has it), curl, port 8080 free (the emulator's invoke API), and
/var/lang/bin/python3, the interpreter Lambda's Python runtimes have, which both the
layer's bootstrap and the minimal launcher exec (create it as a link to a Python 3.9+ if
this machine has none). Every wait is bounded.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/var/lang/bin/python3"
RUNTIME = '''import http.client, os
host, _, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rpartition(":")
c = http.client.HTTPConnection(host, int(port))
while True:
    c.request("GET", "/2018-06-01/runtime/invocation/next")
    r = c.getresponse(); rid = r.getheader("Lambda-Runtime-Aws-Request-Id"); r.read()
    c.request("POST", f"/2018-06-01/runtime/invocation/{rid}/response", body=b'"ok"')
    c.getresponse().read()
'''
INIT_REPORT = re.compile(r"INIT REPORT\(durationMs: ([0-9.]+)\)")


def unzip_with_modes(zip_path, target):
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            path = target / info.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zf.read(info))
            path.chmod((info.external_attr >> 16) & 0o777 or 0o644)


def prepare(work, layer_zip):
    """The three /opt contents and the runtime's bootstrap, under work."""
    opts = {"nothing": work / "opt-nothing", "layer": work / "opt-layer", "minimal": work / "opt-minimal"}
    opts["nothing"].mkdir()
    unzip_with_modes(layer_zip, opts["layer"])
    minimal = opts["minimal"] / "minimal"
    minimal.mkdir(parents=True)
    shutil.copyfile(ROOT / "bench" / "minimal_extension.py", minimal / "minimal_extension.py")
    subprocess.run([PYTHON, "-I", "-S", "-c",
                    "import importlib.util, py_compile; py_compile.compile('minimal_extension.py', "
                    "cfile=importlib.util.cache_from_source('minimal_extension.py'), "
                    "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)"], cwd=minimal, check=True)
    launcher = opts["minimal"] / "extensions" / "minimal"
    launcher.parent.mkdir()
    launcher.write_text(f"#!/bin/sh\ncd /opt/minimal\nexec {PYTHON} -E -s -S -u -m minimal_extension minimal\n")
    launcher.chmod(0o755)
    (work / "runtime.py").write_text(RUNTIME)
    bootstrap = work / "bootstrap"
    bootstrap.write_text(f"#!/bin/sh\nexec {PYTHON} -E -s -S -u {work / 'runtime.py'}\n")
    bootstrap.chmod(0o755)
    return opts, bootstrap


def one_init(rie, opt, bootstrap, log_path):
    """The INIT duration (ms) of one cold start with opt as /opt."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "ASIABENCH", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_SESSION_TOKEN": "bench-token",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    mount = 'mount --bind "$0" /opt && mount -o remount,bind,ro /opt && exec "$@"'
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", mount, str(opt),
                                 rie, "--log-level", "debug", str(bootstrap)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8080/"]).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the emulator did not start; see {log_path}")
            time.sleep(0.02)
        subprocess.run(["curl", "-s", "-m", "15", "-o", "/dev/null", "-XPOST", "-d", "{}",
                        "http://127.0.0.1:8080/2015-03-31/functions/function/invocations"], check=True)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    found = INIT_REPORT.search(Path(log_path).read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no INIT REPORT line; see {log_path}")
    return float(found.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rie", required=True, help="path of the aws-lambda-rie binary")
    parser.add_argument("--runs", type=int, default=18)
    version = re.search(r'^__version__ = "(.*)"$', (ROOT / "extension.py").read_text(), re.M).group(1)
    parser.add_argument("--layer", default=str(ROOT / "dist" / f"parameters-secrets-extension-{version}-layer.zip"),
                        help="the layer zip (build_layer.sh makes it)")
    args = parser.parse_args(argv)
    for need, why in ((os.geteuid() == 0, "root (to mount /opt in a private namespace)"),
                      (os.access(PYTHON, os.X_OK), f"{PYTHON} (link it to a Python 3.9+)"),
                      (shutil.which("curl") and shutil.which("unshare"), "curl and unshare"),
                      (Path(args.layer).is_file(), f"the layer zip {args.layer} (run build_layer.sh)")):
        if not need:
            sys.exit(f"rie: needs {why}")
    samples = {"nothing": [], "layer": [], "minimal": []}
    with tempfile.TemporaryDirectory(prefix="rie-") as work:
        opts, bootstrap = prepare(Path(work), args.layer)
        for index in range(args.runs):
            order = list(samples) if index % 2 == 0 else list(samples)[::-1]
            for kind in order:
                samples[kind].append(one_init(args.rie, opts[kind], bootstrap, Path(work) / f"rie-{kind}.log"))
    median = {kind: statistics.median(values) for kind, values in samples.items()}
    print(f"INIT in the Runtime Interface Emulator, medians of {args.runs} interleaved cold starts")
    for kind in samples:
        print(f"  /opt with {kind:8} {median[kind]:6.1f} ms   (min {min(samples[kind]):.1f}, "
              f"max {max(samples[kind]):.1f})")
    added = {kind: median[kind] - median["nothing"] for kind in ("layer", "minimal")}
    ratio = added["layer"] / added["minimal"]
    print(f"  INIT added: layer {added['layer']:.1f} ms, minimal extension {added['minimal']:.1f} ms: "
          f"{ratio:.2f}x (target <= 0.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
