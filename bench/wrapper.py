#!/usr/bin/env python3
"""Benchmark: the INIT time the layer's runtime wrapper adds (docs/env-values.md).

    .venv/bin/python bench/wrapper.py [--runs N] [--json]

With AWS_LAMBDA_EXEC_WRAPPER=/opt/<name>/wrapper, Lambda starts the runtime as
`wrapper <runtime command...>`: the wrapper (sh) finds a Python, which resolves the
references in the environment through the running extension and execs the runtime
command. What that costs the function's INIT is measured here as Lambda would pay it:

- the layer is built with build_layer.sh and unpacked into a temporary opt/;
- moto (in this process) plays AWS; the extension runs as the bootstrap starts it
  (`python -E -s -S -u -m extension` from opt/<name>), standalone, on a free port;
- the runtime command is /bin/true. One run is spawn to exit of `wrapper /bin/true`;
  the baseline is spawn to exit of `/bin/true` itself, so "added" is the wrapper's whole
  cost: sh, the interpreter's start, importing extension from its .pyc, the lookups
  and the exec;
- 0, 1 and 5 references (5: three parameters and two secrets, one per variable);
  "cached": the same names every run, so every lookup is a cache hit of the extension;
  "not cached": names never asked before, so each is an AWS call (to moto here: a real
  AWS call takes longer or shorter, and that time is the extension's, added to INIT);
- the cases run interleaved, run after run, so that they share the machine's noise.
  Printed: median and minimum of the added time, in ms. Figures, not a test.

Python: /var/lang/bin/python3 when it exists (Lambda's Python runtimes: taken without a
version check), else PARAMETERS_SECRETS_EXTENSION_PYTHON=<this interpreter>, which the
wrapper checks with one more interpreter start (as it would in Lambda).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # bench/bench.py: moto, ports, /ping
    LAYER_NAME,
    REGION,
    TOKEN,
    aws_client,
    free_port,
    machine_description,
    start_moto,
    wait_for_ping,
)

ROOT = Path(__file__).resolve().parent.parent
VAR_LANG_PYTHON = "/var/lang/bin/python3"


def build_and_unpack(workdir):
    done = subprocess.run(["sh", str(ROOT / "build_layer.sh"), "-o", str(workdir / "dist")],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    opt = workdir / "opt"
    with zipfile.ZipFile(done.stdout.splitlines()[-1]) as zf:
        for info in zf.infolist():
            target = opt / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            target.chmod((info.external_attr >> 16) & 0o777)
    return opt / LAYER_NAME


def seed(endpoint, runs):
    """Names for the cached cases, and fresh names for every run of the uncached ones."""
    ssm, secrets = aws_client("ssm", endpoint), aws_client("secretsmanager", endpoint)

    def parameter(name):
        ssm.put_parameter(Name=name, Value="value-of-" + name, Type="SecureString")
        return "{{ssm:" + name + "?withDecryption=true}}"

    def secret(name):
        secrets.create_secret(Name=name, SecretString=json.dumps({"user": "app", "password": "pw-" + name}))
        return "{{secret:" + name + "?jsonKey=password}}"

    def five(prefix):
        return [parameter(f"/wrap/{prefix}/p{i}") for i in range(3)] + \
               [secret(f"wrap/{prefix}/s{i}") for i in range(2)]

    cached = five("cached")
    fresh = {run: five(f"fresh{run}") for run in range(runs)}
    return cached, fresh


def timed(argv, env, cwd):
    began = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    elapsed = (time.perf_counter() - began) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each case (default 15)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    layer_dir = build_and_unpack(workdir)
    moto, moto_port = start_moto()
    endpoint = f"http://127.0.0.1:{moto_port}"
    port = free_port()
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
        "AWS_ENDPOINT_URL": endpoint, "AWS_SESSION_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION,
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port), "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "warn",
    }
    python_note = VAR_LANG_PYTHON
    if not os.path.exists(VAR_LANG_PYTHON):
        base_env["PARAMETERS_SECRETS_EXTENSION_PYTHON"] = sys.executable
        python_note = f"{sys.executable} (PARAMETERS_SECRETS_EXTENSION_PYTHON: one more start for its check)"
    extension = None
    try:
        cached, fresh = seed(endpoint, args.runs)
        log = open(workdir / "extension.log", "wb")
        extension = subprocess.Popen([sys.executable, "-E", "-s", "-S", "-u", "-m", "extension", LAYER_NAME],
                                     cwd=layer_dir, env=base_env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        extension.bench_log = str(workdir / "extension.log")
        wait_for_ping(extension, port)
        wrapper = str(layer_dir / "wrapper")
        task = workdir / "task"
        task.mkdir()

        def variables(references):
            return {f"REF_{i}": f"x-{reference}-y" for i, reference in enumerate(references)}

        cases = {
            "0 references": lambda run: {},
            "1 reference, cached": lambda run: variables(cached[:1]),
            "5 references, cached": lambda run: variables(cached),
            "1 reference, not cached": lambda run: variables(fresh[run][:1]),
            "5 references, not cached": lambda run: variables(fresh[run]),
        }
        # Warm the cache for the cached cases, and the file cache for every file involved.
        timed([wrapper, "/bin/true"], dict(base_env, **variables(cached)), task)
        baseline, added = [], {case: [] for case in cases}
        for run in range(args.runs):
            baseline.append(timed(["/bin/true"], base_env, task))
            for case, make in cases.items():
                added[case].append(timed([wrapper, "/bin/true"], dict(base_env, **make(run)), task))
        base = statistics.median(baseline)
        interpreter = statistics.median(
            timed([sys.executable, "-E", "-s", "-S", "-c", "pass"], base_env, task) for _ in range(args.runs))
        rows = [(case, statistics.median(times) - base, min(times) - base) for case, times in added.items()]
    finally:
        if extension is not None:
            extension.terminate()
            extension.wait(10)
        moto.stop()

    machine = machine_description()
    if args.json:
        json.dump({"machine": machine, "python": python_note, "runs": args.runs, "baseline_ms": base,
                   "interpreter_start_ms": interpreter,
                   "added_ms": {case: {"median": median, "min": minimum} for case, median, minimum in rows}},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, load {machine['load_average_at_start']:.1f}, "
          f"Python {machine['python']}")
    print(f"wrapper's Python: {python_note}; {args.runs} runs per case, interleaved")
    print(f"baseline: /bin/true alone {base:.1f} ms; `python -E -s -S -c pass` {interpreter:.1f} ms")
    print()
    print(f"{'INIT time the wrapper adds':<32}{'median ms':>10}{'min ms':>10}")
    for case, median, minimum in rows:
        print(f"{case:<32}{median:>10.1f}{minimum:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
