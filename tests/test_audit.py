"""What docs/audit.md claims holds: the audit budget of extension.py (at most 2,450 lines
of code: not blank, not only a comment, not in a docstring; DEVELOPERS.md), the trust
boundary it names (at most 1,000 of them, every name a definition of the file), and
every test it cites as proof (each one exists)."""

import ast
import io
import re
import tokenize

from conftest import EXTENSION, ROOT

AUDIT = ROOT / "docs" / "audit.md"
BUDGET = 2450
BOUNDARY_BUDGET = 1000


def code_lines(source):
    """The numbers of the lines that hold code: a token that is not a comment or a line
    end, outside the docstrings of the module, its classes and its functions."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skipped = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return lines


def definitions(tree):
    """{name: node} of the module's functions, classes and assigned names, and of each
    class's methods as Class.method."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
            for member in node.body if isinstance(node, ast.ClassDef) else ():
                if isinstance(member, ast.FunctionDef):
                    found[f"{node.name}.{member.name}"] = member
        elif isinstance(node, ast.Assign):
            found.update((target.id, node) for target in node.targets if isinstance(target, ast.Name))
    return found


def boundary_names():
    text = AUDIT.read_text()
    section = text.split("## The trust boundary", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. \*\*(.+?)\*\*(.*?)(?=^\d+\. |\n\n|\Z)", section, re.MULTILINE | re.DOTALL)
    return [(step, re.findall(r"`([A-Za-z_][\w.]*)`", body.split(".\n", 1)[-1])) for step, body in steps]


def test_extension_py_is_within_the_audit_budget():
    count = len(code_lines(EXTENSION.read_text()))
    assert count <= BUDGET, f"extension.py has {count} lines of code; the audit budget is {BUDGET}"


def test_the_trust_boundary_is_named_in_reading_order_and_within_its_budget():
    source = EXTENSION.read_text()
    found = definitions(ast.parse(source))
    steps = boundary_names()
    assert [step for step, _ in steps] == ["Early start", "Request head", "Query", "Policy", "Outbound exchange",
                                           "SigV4", "Credentials", "Log redaction"]
    lines = set()
    code = code_lines(source)
    for step, names in steps:
        assert names, step
        for name in names:
            assert name in found, f"docs/audit.md names {name!r} ({step}), which extension.py does not define"
            node = found[name]
            lines |= {n for n in code if node.lineno <= n <= node.end_lineno}
    assert len(lines) <= BOUNDARY_BUDGET, f"the trust boundary holds {len(lines)} lines of code"
    # The page says how many it held when written: a figure that drifts far is a page to reread.
    written = int(re.search(r"\((\d+) when this page was written\)", AUDIT.read_text()).group(1))
    assert abs(len(lines) - written) <= 50, (len(lines), written)


def test_every_test_cited_as_proof_exists():
    cited = re.findall(r"`tests/(test_\w+)\.py(?:::(test_\w+))?`", AUDIT.read_text())
    assert len(cited) >= 30
    for module, function in cited:
        path = ROOT / "tests" / f"{module}.py"
        assert path.exists(), module
        if function:
            names = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
            assert function in names, f"docs/audit.md cites tests/{module}.py::{function}, which does not exist"


def test_the_docstring_points_the_auditor_to_the_page():
    assert "docs/audit.md" in ast.get_docstring(ast.parse(EXTENSION.read_text()))
