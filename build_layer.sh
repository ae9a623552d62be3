#!/bin/sh
# Builds the Lambda layer zip: dist/<name>-<version>-layer.zip (the version: the line
# __version__ = "X.Y.Z" of extension.py, printed too), holding exactly
#     extensions/<name>        the bootstrap (mode 0755): Lambda starts every file in
#                              /opt/extensions/, and the extension registers under that
#                              file's name
#     <name>/extension.py      the extension (mode 0644)
#     <name>/wrapper           the runtime wrapper (mode 0755): with
#                              AWS_LAMBDA_EXEC_WRAPPER=/opt/<name>/wrapper, references in
#                              environment variables become values (docs/env-values.md)
#     <name>/__pycache__/extension.cpython-3XY.pyc
#                              its bytecode for each Python 3.9+ found here (python3,
#                              python3.9 ... python3.14 on PATH, and the interpreters listed
#                              in $LAYER_PYTHONS), checked against the source's hash when loaded
# One zip serves x86_64 and arm64 (a shell script and pure Python).
#
# Usage: ./build_layer.sh [-o DIR] [NAME]
#   NAME  extension name (default parameters-secrets-extension, or $EXTENSION_NAME)
#   -o    output directory (default dist/ beside this script, or $DIST_DIR)
# Requires python3 (>= 3.6) at build time, for its zipfile module: zip(1) is not always
# installed and does not make reproducible archives by itself. No network is used.
#
# Reproducible: the same inputs (and Python versions) give the same bytes on every run, so a
# published layer can be checked against a local build: sorted entries, fixed timestamps
# (1980-01-01 00:00, the earliest a zip can hold), fixed Unix modes, no extra fields, and
# entries STORED, not deflated (deflate output may change with the zlib version; the
# layer is small, so compression buys nothing that matters).
# No directory entries: Lambda (like every unzip) creates the parent directories itself.
# The zip's path is printed on stdout as the last line; progress goes to stderr.
set -eu

say() {
    printf 'build_layer: %s\n' "$*" >&2
}

err() {
    printf 'build_layer: ERROR %s\n' "$*" >&2
}

usage() {
    printf 'usage: %s [-o DIR] [NAME]\n' "$0" >&2
}

main() {
    # CDPATH= : a set CDPATH would make cd print the directory into the result.
    root=$(CDPATH="" cd -- "$(dirname -- "$0")" && pwd)
    out_dir=${DIST_DIR:-$root/dist}
    while getopts 'o:h' opt; do
        case $opt in
            o) out_dir=$OPTARG ;;
            h) usage; exit 0 ;;
            *) usage; exit 2 ;;
        esac
    done
    shift $((OPTIND - 1))
    if [ "$#" -gt 1 ]; then
        usage
        exit 2
    fi
    name=${1:-${EXTENSION_NAME:-parameters-secrets-extension}}
    # The name becomes a file name in /opt/extensions/ and the Lambda-Extension-Name header.
    case $name in
        '' | .* | *[!A-Za-z0-9._-]*)
            err "invalid extension name '$name': use letters, digits, '.', '_' and '-', not starting with '.'"
            exit 2
            ;;
    esac
    python=${PYTHON:-python3}
    if ! command -v "$python" >/dev/null 2>&1; then
        err "$python not found: building the layer needs Python 3 (set PYTHON to one)"
        exit 1
    fi
    for f in bootstrap extension.py wrapper; do
        if [ ! -f "$root/$f" ]; then
            err "$root/$f is missing"
            exit 1
        fi
    done
    # The one line that names the release (extension.py, near its top); a second such line
    # would put a line break into the result, which the check below refuses too.
    version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/extension.py")
    case $version in
        [0-9]*.[0-9]*.[0-9]*) ;;
        *) version='' ;;
    esac
    case $version in
        '' | *[!0-9A-Za-z.+-]*)
            err "extension.py has no single line __version__ = \"X.Y.Z\""
            exit 1
            ;;
    esac
    say "version $version"
    mkdir -p -- "$out_dir"
    out_dir=$(CDPATH="" cd -- "$out_dir" && pwd)
    zip_path=$out_dir/$name-$version-layer.zip

    # Cached bytecode for every Python 3.9+ this machine has (the bootstrap runs the
    # extension with -m, so Lambda's Python loads it instead of compiling the source at
    # each cold start). Hash-checked .pyc files hold no timestamp, so they are
    # reproducible; a runtime whose version has no .pyc here compiles the source.
    pyc_dir=$(mktemp -d)
    trap 'rm -rf -- "$pyc_dir"' EXIT
    # shellcheck disable=SC2086 # LAYER_PYTHONS is a list of interpreters, split on spaces
    for candidate in "$python" python3.9 python3.10 python3.11 python3.12 python3.13 python3.14 \
        ${LAYER_PYTHONS:-}; do
        # Present and runnable (a pyenv shim may exist for a version that is not selected).
        "$candidate" -I -S -c '' >/dev/null 2>&1 || continue
        if ! "$candidate" -I -S - "$root/extension.py" "$pyc_dir" <<'EOF'
import importlib.util, os, py_compile, sys
source, out_dir = sys.argv[1:3]
if sys.version_info >= (3, 9):
    pyc = os.path.basename(importlib.util.cache_from_source("extension.py"))
    py_compile.compile(source, cfile=os.path.join(out_dir, pyc), dfile="extension.py", doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
EOF
        then
            err "$candidate could not compile extension.py"
            exit 1
        fi
    done

    "$python" - "$root" "$name" "$zip_path" "$pyc_dir" <<'EOF'
import hashlib
import os
import sys
import zipfile

root, name, zip_path, pyc_dir = sys.argv[1:5]
entries = {
    "extensions/" + name: (os.path.join(root, "bootstrap"), 0o755),
    name + "/extension.py": (os.path.join(root, "extension.py"), 0o644),
    name + "/wrapper": (os.path.join(root, "wrapper"), 0o755),
}
for pyc in os.listdir(pyc_dir):
    entries[name + "/__pycache__/" + pyc] = (os.path.join(pyc_dir, pyc), 0o644)
with open(entries[name + "/extension.py"][0], "rb") as f:
    source = f.read()
try:
    # A syntax error would otherwise only show up in Lambda, as a crashed extension.
    compile(source, "extension.py", "exec", dont_inherit=True)
except SyntaxError as e:
    sys.exit("build_layer: ERROR extension.py does not compile: %s" % e)

# Written beside the target and renamed: a failed build never leaves a half zip behind.
tmp = zip_path + ".tmp"
try:
    with zipfile.ZipFile(tmp, "w") as zf:
        for arcname in sorted(entries):
            path, mode = entries[arcname]
            with open(path, "rb") as f:
                data = f.read()
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # Unix, so that unzip honours the mode bits below
            info.external_attr = (0o100000 | mode) << 16  # regular file + permissions
            zf.writestr(info, data)
    os.replace(tmp, zip_path)
except BaseException:
    if os.path.exists(tmp):
        os.unlink(tmp)
    raise
with open(zip_path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
sys.stderr.write("build_layer: %d bytes, sha256 %s\n" % (os.path.getsize(zip_path), digest))
# A runtime without its bytecode here compiles extension.py at every cold start
# (about 20 ms more): say which ones have it, so that LAYER_PYTHONS can add the rest.
versions = sorted((pyc.split(".")[1] for pyc in os.listdir(pyc_dir)), key=lambda tag: int(tag[8:]))
shown = ", ".join("%s.%s" % (tag[8], tag[9:]) for tag in versions)  # cpython-311: 3.11
sys.stderr.write("build_layer: bytecode for Python %s; another runtime compiles extension.py at each "
                 "cold start (add its interpreter to LAYER_PYTHONS)\n" % (shown or "none"))
EOF
    say "built $zip_path (version $version)"
    say "runtime wrapper: set AWS_LAMBDA_EXEC_WRAPPER=/opt/$name/wrapper to resolve {{ssm:...}} and {{secret:...}} in environment variables"
    printf '%s\n' "$zip_path"
}

main "$@"
