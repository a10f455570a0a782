"""The README's Python API example runs as written (on small planted shards, for a few steps)."""

import re
from pathlib import Path

import torch

from crosscoder import CrossCoder

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_api_example_trains_saves_and_loads(small_shards, tmp_path, monkeypatch):
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    setting = 'shards, steps = "runs/default/shards", 200'
    assert setting in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace(setting, f"shards, steps = {small_shards!r}, 30"), "README.md", "exec"), namespace)
    model, codes = namespace["model"], namespace["codes"]
    assert namespace["step"] == 29 and torch.isfinite(namespace["loss"])
    saved = CrossCoder.from_pretrained(tmp_path / "my-crosscoder")
    assert saved.spec.latents == 1024 and codes.shape == (512, 1, 1024)
    assert 0 < float((codes > 0).sum(-1).float().mean()) < 100  # the running threshold, after 30 steps
    assert model.threshold_updates.item() == 30
