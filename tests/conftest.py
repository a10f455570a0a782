import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from crosscoder.config import RunConfig, SyntheticConfig  # noqa: E402
from crosscoder.synthetic import write_synthetic  # noqa: E402


def small_synthetic(**overrides) -> SyntheticConfig:
    cfg = SyntheticConfig(widths=[16, 24], features=64, tokens=8192, seq_len=64, samples_per_shard=16,
                          active_per_token=3.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """A small planted dataset: 2 sources of widths 16 and 24, 8 shards of 16 samples × 64 tokens."""
    root = tmp_path_factory.mktemp("small") / "shards"
    write_synthetic(small_synthetic(), str(root), progress=False)
    return str(root)


def small_run_config(**train) -> RunConfig:
    cfg = RunConfig(name="test")
    cfg.train.latents = 96
    cfg.train.k = 4
    cfg.train.batch_size = 256
    cfg.train.steps = 30
    cfg.train.lr = 3e-3
    cfg.train.lr_warmup_steps = 5
    cfg.train.dead_tokens = 2000
    cfg.train.shuffle_samples = 8
    cfg.train.checkpoint_every = 10
    cfg.train.log_every = 5
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg
