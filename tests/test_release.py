"""Releases: one version in one place (extension.py's __version__) and every file that
names it agreeing, and tools/dev.py release's checks, each refusal tried on a throwaway
git repository holding a copy of this project (never this one: nothing here is tagged,
committed or built into dist/)."""

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys

import pytest

import extension
from conftest import ROOT

VERSION = extension.__version__
NAME = "parameters-secrets-extension"

_spec = importlib.util.spec_from_file_location("dev", ROOT / "tools" / "dev.py")
dev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dev)

# An identity for the throwaway repository's commits, and no signing whatever the
# machine's git configuration says.
GIT_SETTINGS = ["-c", "user.name=Release Test", "-c", "user.email=release@test.invalid",
                "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", "-c", "init.defaultBranch=main"]


# ------------------------------------------------------------------ the one version


def test_the_version_is_semantic_and_written_once():
    assert dev.SEMVER.fullmatch(VERSION), VERSION
    source = (ROOT / "extension.py").read_text()
    # build_layer.sh reads exactly this line (sed), so there must be one.
    assert re.findall(r'^__version__ = "(.*)"$', source, re.MULTILINE) == [VERSION]


def test_dash_dash_version_prints_the_name_and_the_version():
    done = subprocess.run([sys.executable, str(ROOT / "extension.py"), "--version"], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{NAME} {VERSION}\n", "")


def _numbers(version):
    return tuple(int(number) for number in version.split("-")[0].split("."))


def test_the_changelog_s_newest_release_is_this_version():
    # A raised __version__ without its changelog entry (or the reverse) fails here, long
    # before anyone runs the release command. Between releases __version__ is the next
    # one with "-dev" (a build of main is not the last release), its entries under
    # [Unreleased].
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    if VERSION.endswith("-dev"):
        newest = next(m.group(1) for m in dev.RELEASE_HEADING.finditer(text) if m.group(1) != "Unreleased")
        assert _numbers(VERSION) > _numbers(newest), (VERSION, newest)
    else:
        assert "### " in dev.changelog_entry(text, VERSION)


def test_every_changelog_entry_uses_keep_a_changelog_sections():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = [m for m in dev.RELEASE_HEADING.finditer(text) if m.group(1) != "Unreleased"]
    assert releases, "no release in CHANGELOG.md"
    for heading in releases:
        assert dev.SEMVER.fullmatch(heading.group(1)) and heading.group(2), heading.group(0)
    sections = set(re.findall(r"^### (.*)$", text, re.MULTILINE))
    assert sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, sections


def test_security_policy_names_what_is_in_scope():
    policy = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    for part in ("extension.py", "bootstrap", "wrapper", "build_layer.sh", "CHANGELOG.md", "sha256"):
        assert part in policy, part


# ------------------------------------------------------------- tools/dev.py release


def _git(repo, *args):
    return subprocess.run(["git", *GIT_SETTINGS, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def _commit(repo, message="change"):
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _edit(repo, relative, old, new):
    path = repo / relative
    text = path.read_text(encoding="utf-8")
    assert old in text, (relative, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture
def project(tmp_path):
    """A git repository holding this project's files (committed or not, but not ignored),
    in one commit, with the changelog's recorded hash left out (it depends on the Pythons
    of the machine that built it)."""
    repo = tmp_path / "project"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for relative in filter(None, listed):
        if (ROOT / relative).is_file():  # not one deleted in the working tree
            (repo / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, repo / relative)
    changelog = repo / "CHANGELOG.md"
    changelog.write_text("".join(line for line in changelog.read_text(encoding="utf-8").splitlines(True)
                                 if not dev.RECORDED_SHA256.search(line)), encoding="utf-8")
    _git(tmp_path, "init", "-q", str(repo))
    _commit(repo, "the project")
    return repo


class FakeTests:
    """run_tests for dev.release: counts its calls, answers an exit status."""

    def __init__(self, status=0):
        self.status, self.calls = status, 0

    def __call__(self):
        self.calls += 1
        return self.status


def _refused(repo, capsys, tests=None):
    """The refusal's message, after checking that nothing was built or tagged."""
    tests = tests or FakeTests()
    assert dev.release(repo, tests) == 1
    out, err = capsys.readouterr()
    assert out in ("", f"[dev] release {VERSION} of commit {_git(repo, 'rev-parse', 'HEAD')}: running the tests\n")
    assert err.startswith("[dev] release refused: "), (out, err)
    assert not (repo / "dist").exists()
    assert _git(repo, "tag", "--list") == ""
    return err[len("[dev] release refused: "):].rstrip("\n")


def test_release_refuses_a_tree_with_changes(project, capsys):
    tests = FakeTests()
    _edit(project, "extension.py", "import errno\n", "import errno  # edited\n")
    message = "the working tree is not clean (git status): commit or remove what is not in HEAD"
    assert _refused(project, capsys, tests) == message
    _git(project, "checkout", "--", "extension.py")
    (project / "notes.txt").write_text("not committed")  # untracked counts too
    assert _refused(project, capsys, tests) == message
    assert tests.calls == 0  # refused before the tests ran


def test_release_refuses_a_changelog_whose_newest_release_is_another(project, capsys):
    _edit(project, "CHANGELOG.md", f"## [{VERSION}] - ", "## [9.9.9] - ")
    _commit(project)
    assert _refused(project, capsys) == (
        f"CHANGELOG.md's newest release is 9.9.9, extension.py's __version__ is {VERSION}")


def test_release_refuses_a_version_raised_without_its_changelog_entry(project, capsys):
    _edit(project, "extension.py", f'__version__ = "{VERSION}"', '__version__ = "99.0.0"')
    _commit(project)
    assert _refused(project, capsys) == (
        f"CHANGELOG.md's newest release is {VERSION}, extension.py's __version__ is 99.0.0")


def test_release_refuses_a_development_version(project, capsys):
    _edit(project, "extension.py", f'__version__ = "{VERSION}"', '__version__ = "99.0.0-dev"')
    _commit(project)
    assert _refused(project, capsys) == (
        "99.0.0-dev is the version between releases: set the release's own in __version__ first")


def test_release_refuses_entries_left_under_unreleased(project, capsys):
    _edit(project, "CHANGELOG.md", "## [Unreleased]\n", "## [Unreleased]\n\n### Fixed\n\n- Something.\n")
    _commit(project)
    assert _refused(project, capsys) == (
        "CHANGELOG.md has entries under [Unreleased]: move them into the release's entry")


def test_release_refuses_an_undated_entry(project, capsys):
    text = (project / "CHANGELOG.md").read_text(encoding="utf-8")
    dated = re.search(rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d\d-\d\d$", text, re.MULTILINE).group(0)
    _edit(project, "CHANGELOG.md", dated, f"## [{VERSION}]")
    _commit(project)
    assert _refused(project, capsys) == (
        f"CHANGELOG.md's entry for {VERSION} has no date (## [{VERSION}] - YYYY-MM-DD)")


def test_release_refuses_a_template_naming_another_version(project, capsys):
    _edit(project, "examples/template.yaml", f"{NAME}-{VERSION}-layer.zip", f"{NAME}-0.9.0-layer.zip")
    _commit(project)
    assert _refused(project, capsys) == (
        f"examples/template.yaml's layer (Description, ContentUri) does not name {VERSION}")


@pytest.mark.parametrize("tag", [f"v{VERSION}", VERSION])
def test_release_refuses_a_version_already_tagged(project, capsys, tag):
    tests = FakeTests()
    _git(project, "tag", tag)
    assert dev.release(project, tests) == 1
    err = capsys.readouterr().err
    assert err == (f"[dev] release refused: {VERSION} is already tagged ({tag}): a version is never released "
                   "twice; raise __version__ and add its changelog entry\n")
    assert tests.calls == 0 and not (project / "dist").exists()


def test_release_refuses_when_the_tests_fail(project, capsys):
    tests = FakeTests(status=1)
    assert _refused(project, capsys, tests) == "the tests failed"
    assert tests.calls == 1


def test_release_refuses_two_builds_that_differ(project, capsys):
    # A build that writes something new each time (a random zip comment): the comparison
    # of the two fresh builds must catch it.
    _edit(project, "build_layer.sh", '    with zipfile.ZipFile(tmp, "w") as zf:\n',
          '    with zipfile.ZipFile(tmp, "w") as zf:\n        zf.comment = os.urandom(8)\n')
    _commit(project)
    assert dev.release(project, FakeTests()) == 1
    err = capsys.readouterr().err
    assert err.startswith("[dev] release refused: two builds of ") and "differ" in err, err
    assert "the build is not reproducible" in err


def test_release_prints_the_hash_to_record_then_the_tag_command(project, capsys):
    tests = FakeTests()
    assert dev.release(project, tests) == 1  # built, but the changelog does not record it yet
    out, err = capsys.readouterr()
    zip_path = project / "dist" / f"{NAME}-{VERSION}-layer.zip"
    data = zip_path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    assert f"[dev] version: {VERSION}\n" in out
    assert f"[dev] zip:     {zip_path} (built twice from fresh clones of " in out
    assert f"[dev] size:    {len(data)} bytes\n" in out and f"[dev] sha256:  {sha256}\n" in out
    record = out.splitlines()[-1]
    assert record.startswith(f"Layer zip `{NAME}-{VERSION}-layer.zip`: sha256 `{sha256}`, {len(data)} bytes, "
                             "bytecode for Python "), out
    assert err == ""

    # Recorded in the release's entry and committed: ready, and the exact tag command.
    shutil.rmtree(project / "dist")
    _edit(project, "CHANGELOG.md", f"## [{VERSION}] - ", f"{record}\n\n## [{VERSION}] - ")  # wrong place
    _commit(project)
    assert _refused(project, capsys) == (
        "CHANGELOG.md has entries under [Unreleased]: move them into the release's entry")
    _git(project, "reset", "-q", "--hard", "HEAD~1")
    text = (project / "CHANGELOG.md").read_text(encoding="utf-8")
    heading = re.search(rf"^## \[{re.escape(VERSION)}\] - .*$", text, re.MULTILINE).group(0)
    _edit(project, "CHANGELOG.md", heading + "\n", f"{heading}\n\n{record}\n")
    commit = _commit(project, "record the release's hash")
    assert dev.release(project, tests) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-2:] == [
        "[dev] ready. Tag it (nothing was tagged, pushed or published):",
        f"git tag -a v{VERSION} -m '{NAME} {VERSION}' {commit}"]
    assert zip_path.read_bytes() == data  # the changelog is not in the zip
    assert tests.calls == 2
    assert _git(project, "tag", "--list") == "" and _git(project, "remote") == ""


def test_release_refuses_a_recorded_hash_this_build_does_not_match(project, capsys):
    text = (project / "CHANGELOG.md").read_text(encoding="utf-8")
    heading = re.search(rf"^## \[{re.escape(VERSION)}\] - .*$", text, re.MULTILINE).group(0)
    _edit(project, "CHANGELOG.md", heading + "\n", f"{heading}\n\nLayer zip: sha256 `{'0' * 64}`.\n")
    _commit(project)
    assert dev.release(project, FakeTests()) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"[dev] release refused: CHANGELOG.md records sha256 {'0' * 64} for {VERSION}, "
                          "but this build is "), err


def test_the_command_line_refuses_before_needing_the_venv(project):
    # The copy has no .venv/: a refusal must come without building one (no package index).
    (project / "untracked").write_text("x")
    done = subprocess.run([sys.executable, str(project / "tools" / "dev.py"), "release"], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("[dev] release refused: the working tree is not clean (git status): commit or "
                           "remove what is not in HEAD\n")
    assert not (project / ".venv").exists()
    done = subprocess.run([sys.executable, str(project / "tools" / "dev.py"), "release", "--push"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "usage: python3 tools/dev.py release\n")
