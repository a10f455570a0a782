#!/usr/bin/env bash
# A wheelhouse for a GPU machine that has a CUDA build of torch but no network (an air-gapped
# cluster node, a prebuilt CUDA image): every package the crosscoder package needs, at this
# project's pins (requirements.txt), for that machine's Python, less what it already has.
#
#   bash scripts/gpu-wheels.sh DIR [--python 3.12] [--have FILE] [--without A,B] [--slim]
#
#   --python  the GPU machine's Python version (wheels are chosen for it and manylinux x86-64)
#   --have    names (or `pip list --format=freeze` lines) of the packages installed there; torch,
#             triton and nvidia-* (the machine's CUDA torch brings them) and pip, setuptools and
#             wheel are always left out
#   --without packages (name) or extras (name[extra]) to leave out, with what only they need; the
#             GPU check reads no S3 and no hub dataset and starts no dashboard: s3fs,datasets,ray[default]
#   --slim    leave out Ray's Java jar (32 MB of a 79 MB wheel; Python jobs never load it)
#   --list    print the pinned packages it would fetch, and fetch nothing
#
# Then, on the GPU machine, from the repository root:
#
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 bash scripts/gpu-check.sh
#
# Why a closure of installed metadata and not pip's resolver: pip cannot resolve for another
# Python while deepspeed is a source archive only, and requirements.txt is already the resolved
# set. deepspeed is built here into a pure-Python wheel (DS_BUILD_OPS=0: the ops it uses are
# compiled just in time there, as on every install of this project). Needs this checkout's .venv
# (scripts/install.sh) or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu-wheels.sh DIR [--python 3.12] [--have FILE] [--without A,B] [--slim]}
shift
PY_VERSION=3.12 HAVE="" WITHOUT="" SLIM=0 LIST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY_VERSION=$2; shift 2 ;;
        --have) HAVE=$2; shift 2 ;;
        --without) WITHOUT=$2; shift 2 ;;
        --slim) SLIM=1; shift ;;
        --list) LIST=1; shift ;;
        *) echo "gpu-wheels: unknown argument $1" >&2; exit 2 ;;
    esac
done
VENV=${PYTHON:-.venv/bin/python}  # the environment whose installed metadata and pins are taken
[ -x "$VENV" ] || { echo "gpu-wheels: no $VENV; run scripts/install.sh first (or set PYTHON)" >&2; exit 1; }
# the closure of the package's requirements (with their extras), as pinned in requirements.txt
NEEDED=$("$VENV" - "$HAVE" "$WITHOUT" <<'PY'
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


have = set()
if sys.argv[1]:
    for line in open(sys.argv[1]):
        name = re.split(r"[=<>~!\s\[;@]", line.strip(), maxsplit=1)[0]
        if name and not name.startswith("#"):
            have.add(canon(name))
# the machine's CUDA torch brings its own (torch, triton, nvidia-*), and every Python has pip's tools
machine = {"torch", "triton", "pip", "setuptools", "wheel"}
without, without_extras = set(), {}  # "name" drops a package, "name[extra]" one of its extras
for item in filter(None, sys.argv[2].split(",")):
    req = Requirement(item)
    if req.extras:
        without_extras.setdefault(canon(req.name), set()).update(req.extras)
    else:
        without.add(canon(req.name))
pins = {}
for line in open("requirements.txt"):
    if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==", 1)
        pins[canon(name)] = version
seen, todo = set(), [(canon(str(r.name)), set(r.extras)) for r in map(Requirement, metadata.requires("crosscoder") or [])
                     if not r.marker or r.marker.evaluate({"extra": ""})]
while todo:
    name, extras = todo.pop()
    extras = extras - without_extras.get(name, set())
    key = (name, frozenset(extras))
    if key in seen or name in without or name in machine or name.startswith("nvidia-"):
        continue
    seen.add(key)
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        todo.append((canon(req.name), set(req.extras)))
for name in sorted({name for name, _ in seen} - have):
    if name not in pins:
        sys.exit(f"gpu-wheels: {name} is required but not pinned in requirements.txt")
    print(f"{name}=={pins[name]}")
PY
)
if [ "$LIST" = 1 ]; then echo "$NEEDED"; exit 0; fi
mkdir -p "$OUT"
echo "$NEEDED" > "$OUT/needed.txt"
echo "gpu-wheels: $(wc -l < "$OUT/needed.txt") packages for Python $PY_VERSION (list: $OUT/needed.txt)"

grep -v '^deepspeed==' "$OUT/needed.txt" > "$OUT/binary.txt" || true
if [ -s "$OUT/binary.txt" ]; then
    "$VENV" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$OUT" -r "$OUT/binary.txt"
fi
rm -f "$OUT/binary.txt"
if grep -q '^deepspeed==' "$OUT/needed.txt"; then
    DS_BUILD_OPS=0 "$VENV" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(grep '^deepspeed==' "$OUT/needed.txt")"
fi

if [ "$SLIM" = 1 ]; then
    for wheel in "$OUT"/ray-*.whl; do
        [ -e "$wheel" ] || continue
        "$VENV" - "$wheel" <<'PY'
import os
import sys
import zipfile

path = sys.argv[1]
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if item.filename.startswith("ray/jars/"):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
        dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
os.replace(slim, path)
PY
    done
fi
echo "gpu-wheels: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -ch "$OUT"/*.whl | tail -1 | cut -f1) in $OUT"
