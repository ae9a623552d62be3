"""extension.py is one stdlib-only file for Python 3.9+, and importing it does nothing.

The layer ships extension.py alone: any third-party import would fail on Lambda, and the
file must run on every Python runtime Lambda still offers (3.9 onwards). Importing it (as
the unit tests do) must not start a server, read the environment or print anything.
"""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import EXTENSION, ROOT

# Modules removed from the standard library by PEP 594 (3.13) and distutils (3.12):
# still listed in an older interpreter's sys.stdlib_module_names, gone on newer Lambda
# runtimes (python3.13), so importing one would break there.
REMOVED_MODULES = {
    "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt",
    "distutils", "imghdr", "imp", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev",
    "pipes", "smtpd", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",
}


def _source():
    return EXTENSION.read_text(encoding="utf-8")


def _tree():
    return ast.parse(_source(), filename=str(EXTENSION))


def _imported_modules(tree):
    """(top-level module, line) for every import statement and dynamic import call."""
    found = []
    problems = []
    import_module_aliases = {"import_module"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"line {node.lineno}: relative import (a single file has none)")
            else:
                found.append((node.module.split(".")[0], node.lineno))
                if node.module == "importlib":
                    import_module_aliases.update(
                        a.asname or a.name for a in node.names if a.name == "import_module")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        dynamic = (
            (isinstance(func, ast.Name) and func.id in ({"__import__"} | import_module_aliases))
            or (isinstance(func, ast.Attribute) and func.attr in ("import_module", "__import__"))
        )
        if not dynamic:
            continue
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str):
            found.append((node.args[0].value.split(".")[0], node.lineno))
        else:
            problems.append(f"line {node.lineno}: dynamic import of a computed name")
    return found, problems


def test_the_import_scanner_sees_every_kind_of_import():
    """Self-check of the scanner on a sample, so the real test cannot pass vacuously."""
    sample = ast.parse(
        "import os, json.decoder as d\n"
        "from http import server\n"
        "from . import sibling\n"
        "import importlib\n"
        "from importlib import import_module as im\n"
        "yaml = __import__('yaml')\n"
        "requests = importlib.import_module('requests.adapters')\n"
        "boto3 = im('boto3')\n"
        "x = __import__(name)\n"
    )
    found, problems = _imported_modules(sample)
    names = {name for name, _ in found}
    assert {"os", "json", "http", "importlib", "yaml", "requests", "boto3"} <= names
    assert len(problems) == 2  # the relative import and the computed name


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"),
                    reason="sys.stdlib_module_names needs Python 3.10+ to run this check")
def test_imports_only_standard_library_modules():
    found, problems = _imported_modules(_tree())
    assert found, "no imports found at all: the scanner or the file is broken"
    assert problems == []
    foreign = sorted({f"{name} (line {line})" for name, line in found
                      if name not in sys.stdlib_module_names  # novm (skipped before 3.10)
                      and name != "__future__"})
    assert foreign == [], f"non-stdlib imports: {foreign}"
    removed = sorted({f"{name} (line {line})" for name, line in found
                      if name in REMOVED_MODULES})
    assert removed == [], f"modules removed from newer Pythons: {removed}"


def _vermin_command():
    exe = Path(sys.executable).parent / "vermin"
    if exe.exists():
        return [str(exe)]
    try:
        import vermin  # noqa: F401
    except ImportError:
        return None
    # vermin 1.9 has no __main__ module, so "python -m vermin" does not work.
    return [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())"]


def test_vermin_finds_nothing_above_python_3_9():
    cmd = _vermin_command()
    if cmd is None:
        pytest.skip("vermin is not installed (pip install vermin; it is in requirements-dev.txt)")
    args = ["-t=3.9-", "--no-tips", "--violations"]
    # Without "from __future__ import annotations", annotations are evaluated when the
    # def/class runs, so e.g. "int | None" in a signature breaks 3.9: let vermin see them.
    if "from __future__ import annotations" not in _source():
        args.append("--eval-annotations")
    result = subprocess.run(cmd + args + [str(EXTENSION)], capture_output=True, text=True,
                            timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, f"vermin reports violations:\n{result.stdout}\n{result.stderr}"
    assert "Target versions not met" not in result.stdout


def test_vermin_check_would_catch_a_violation(tmp_path):
    """Self-check: the same vermin invocation fails on a 3.10-only construct."""
    cmd = _vermin_command()
    if cmd is None:
        pytest.skip("vermin is not installed")
    bad = tmp_path / "bad.py"
    bad.write_text("pairs = list(zip([1], [2], strict=True))\n")
    result = subprocess.run(cmd + ["-t=3.9-", "--no-tips", "--violations", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def _no_future_annotations(tree):
    return not any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                   and any(a.name == "annotations" for a in n.names) for n in tree.body)


def test_no_union_operator_in_evaluated_annotations():
    """``X | Y`` in an evaluated annotation raises TypeError on 3.9 at import time."""
    tree = _tree()
    if not _no_future_annotations(tree):
        return  # annotations are strings, never evaluated at run time
    bad = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    annotations.append(a.annotation)
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for ann in annotations:
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                   for n in ast.walk(ann)):
                bad.append(getattr(ann, "lineno", "?"))
    assert bad == [], f"'X | Y' annotations (need 3.10) on lines {bad}"


def test_compiles_without_warnings():
    """Invalid escape sequences etc. warn today and become errors in later Pythons."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(_source(), str(EXTENSION), "exec")


def _import_in_clean_process(env, code="import extension"):
    # -S: no site-packages (the layer has none); -E: ignore PYTHON* variables. The
    # timeout only turns a hang (a server started at import) into a failure.
    return subprocess.run([sys.executable, "-S", "-E", "-c", code], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=30)


def test_import_has_no_side_effects_with_an_empty_environment():
    code = (
        "import threading, sys\n"
        "import extension\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    result = _import_in_clean_process({}, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_import_does_not_read_the_environment():
    """A hostile environment changes nothing at import: configuration is read at start."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_SESSION_TOKEN": "tok",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9",
        "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": "not-a-port",
        "PARAMETERS_SECRETS_EXTENSION_LOG_LEVEL": "debug",
        "SSM_PARAMETER_STORE_TTL": "99999",
        "PARAMETERS_AND_SECRETS_EXTENSION_CACHE_SIZE": "5",
    }
    code = (
        "import threading\n"
        "import extension\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    result = _import_in_clean_process(env, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_runs_with_site_packages_disabled():
    """``python -S extension.py`` starts (it needs nothing from site-packages)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    # No token configured: the documented refusal (exit 2) proves the script ran its main
    # code under -S without an ImportError (which would exit 1 with a traceback).
    result = subprocess.run([sys.executable, "-S", "-E", str(EXTENSION)], cwd=str(ROOT),
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
