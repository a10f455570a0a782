"""scripts/gpu-wheels.sh: the wheelhouse for a GPU machine without network holds the closure of the
package's requirements at this project's pins, less what that machine has, the torch family and
what `--without` leaves out (`--list` fetches nothing, so this runs offline); and scripts/gpu-check.sh
on a machine without CUDA says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def needed(tmp_path: Path, have: list[str], *args: str) -> dict[str, str]:
    (tmp_path / "have.txt").write_text("\n".join(have) + "\n")
    done = subprocess.run(["bash", "scripts/gpu-wheels.sh", str(tmp_path / "wheels"), "--list", "--have",
                           str(tmp_path / "have.txt"), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    return dict(line.split("==") for line in done.stdout.split())


def installed() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def test_only_what_the_machine_lacks_at_the_projects_pins(tmp_path):
    pins = dict(line.strip().split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    everything = needed(tmp_path, [])
    assert {"ray", "deepspeed", "transformers", "safetensors", "tomli-w", "pydantic"} <= set(everything)
    assert not [n for n in everything if n in ("torch", "triton") or n.startswith("nvidia-")]
    assert all(pins[name] == version for name, version in everything.items())
    # this environment, less Ray and tomli-w: only those two (every dependency of Ray is here)
    have = [line for line in installed() if line.split("==")[0].lower() not in ("ray", "tomli-w", "tomli_w")]
    assert needed(tmp_path, have) == {"ray": pins["ray"], "tomli-w": pins["tomli-w"]}


def test_without_leaves_out_a_package_or_an_extra_with_what_only_it_needs(tmp_path):
    everything = needed(tmp_path, [])
    assert {"s3fs", "aiobotocore", "aiohttp-cors", "py-spy"} <= set(everything)
    slim = needed(tmp_path, [], "--without", "s3fs,ray[default]")
    assert not {"s3fs", "aiobotocore", "aiohttp-cors", "py-spy"} & set(slim)
    assert {"ray", "deepspeed", "pydantic", "jsonschema"} <= set(slim)  # pydantic: deepspeed needs it too


def test_the_gpu_check_says_in_one_line_that_it_needs_a_gpu():
    """scripts/gpu-check.sh on a machine (or a torch build) without CUDA: one line and exit 1, before
    any test or benchmark starts."""
    done = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu-check: no CUDA device visible to torch ") and done.stderr.count("\n") == 1
