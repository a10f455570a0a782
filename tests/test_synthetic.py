"""The planted-truth generator: chat-only features tied to a shared parent fire only with it."""

import io

import numpy as np
import pytest

from crosscoder.config import SyntheticConfig
from crosscoder.shards import iter_samples, read_manifest
from crosscoder.storage import Root
from crosscoder.synthetic import (
    CLASSES,
    PlantedDictionary,
    plant_dictionary,
    read_planted,
    sample_activations,
    write_synthetic,
)


def coupled_config(**overrides) -> SyntheticConfig:
    cfg = SyntheticConfig(widths=[64, 64], features=64, active_per_token=4.0, noise=0.0, tokens=4096,
                          seq_len=64, samples_per_shard=32, dtype="float32", chat_only_parent_fraction=1.0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def firings(planted, cfg: SyntheticConfig, n_tokens: int) -> np.ndarray:
    """[n_tokens, F] which planted features fire, solved from sampled activations (noise = 0)."""
    acts = sample_activations(planted, cfg, n_tokens, np.random.default_rng(0))
    # each source is coeff @ (magnitudes * directions): solve for coeff exactly
    chat_dirs = planted.magnitudes[:, 1:2] * planted.directions[1]
    base_dirs = planted.magnitudes[:, 0:1] * planted.directions[0]
    both = np.concatenate([base_dirs, chat_dirs], axis=1)  # [F, 128]: full row rank for F = 64
    coeff = np.linalg.lstsq(both.T, acts.T.astype(np.float64), rcond=None)[0].T
    return coeff > 0.25  # coefficients are drawn from [0.5, 1.5] when a feature fires


@pytest.mark.parametrize("fixed_count", [True, False])
def test_children_fire_only_with_their_parent_on_about_half_of_its_firings(fixed_count):
    cfg = coupled_config(fixed_count=fixed_count, chat_only_parent_fraction=0.5)
    planted = plant_dictionary(cfg)
    chat_only = np.flatnonzero(planted.classes == CLASSES.index("chat_only"))
    children = planted.children
    assert len(children) == round(0.5 * len(chat_only)) and set(children) <= set(chat_only)
    assert planted.parents.shape == (cfg.features, 1)
    parents = planted.parents[children, 0]
    assert (planted.classes[parents] == CLASSES.index("shared")).all() and len(set(parents)) == len(parents)

    fires = firings(planted, cfg, 20000)
    assert not (fires[:, children] & ~fires[:, parents]).any()  # never without the parent
    share = fires[:, children].sum(0) / fires[:, parents].sum(0)
    assert ((share > 0.4) & (share < 0.6)).all(), share
    free = np.setdiff1d(chat_only, children)
    rate_child, rate_free = fires[:, children].mean(), fires[:, free].mean()
    assert 0.6 < rate_child / rate_free < 1.6, (rate_child, rate_free)  # the parent fires twice as often


def test_children_sharing_a_parent_fire_independently_of_each_other():
    cfg = coupled_config(children_per_parent=3)
    planted = plant_dictionary(cfg)
    children = planted.children
    parents, counts = np.unique(planted.parents[children, 0], return_counts=True)
    assert len(children) == 6 and counts.tolist() == [3, 3]
    assert (planted.classes[parents] == CLASSES.index("shared")).all()

    fires = firings(planted, cfg, 40000)
    for parent in parents:
        siblings = fires[:, children[planted.parents[children, 0] == parent]]
        assert not (siblings & ~fires[:, [parent]]).any()
        on_parent = siblings[fires[:, parent]]
        assert ((on_parent.mean(0) > 0.4) & (on_parent.mean(0) < 0.6)).all()
        for i, j in [(0, 1), (0, 2), (1, 2)]:  # independent halves: a quarter of the parent's firings
            both = (on_parent[:, i] & on_parent[:, j]).mean()
            assert 0.18 < both < 0.32, both


def test_a_child_with_several_parents_fires_only_with_one_of_them_at_its_usual_rate():
    cfg = coupled_config(parents_per_child=4, fixed_count=False)
    planted = plant_dictionary(cfg)
    children = planted.children
    assert planted.parents.shape == (cfg.features, 4) and len(children) == 6
    for parents in planted.parents[children]:
        assert len(set(parents)) == 4 and (planted.classes[parents] == CLASSES.index("shared")).all()

    fires = firings(planted, cfg, 40000)
    free_rate = np.mean([fires[:, f].mean() for f in np.flatnonzero(planted.classes == CLASSES.index("shared"))
                         if f not in planted.parents])
    for child, parents in zip(children, planted.parents[children]):
        with_parent = fires[:, parents].any(1)
        assert fires[:, child].sum() > 100 and not (fires[:, child] & ~with_parent).any()
        assert 0.7 < fires[:, child].mean() / free_rate < 1.4  # the parents' rates are not raised
        # it fires with every one of its parents, not with one of them only
        assert all(0.1 < (fires[:, child] & fires[:, p]).sum() / fires[:, child].sum() for p in parents)


def test_parents_are_written_with_the_planted_dictionary_and_bad_fractions_are_refused(tmp_path):
    cfg = coupled_config()
    write_synthetic(cfg, str(tmp_path / "shards"), progress=False)
    root = Root(str(tmp_path / "shards"))
    planted, again = read_planted(root), plant_dictionary(cfg)
    assert (planted.parents == again.parents).all() and (planted.parents >= 0).sum() > 0
    assert sum(len(s.tokens) for s in iter_samples(root, read_manifest(root))) == cfg.tokens
    with pytest.raises(ValueError, match="chat_only_parent_fraction"):
        plant_dictionary(coupled_config(chat_only_parent_fraction=1.5))
    with pytest.raises(ValueError, match="shared parents"):
        plant_dictionary(coupled_config(shared_fraction=0.0, chat_only_fraction=0.7))
    with pytest.raises(ValueError, match="children_per_parent must be at least 1"):
        plant_dictionary(coupled_config(children_per_parent=0))
    with pytest.raises(ValueError, match="not both"):
        plant_dictionary(coupled_config(children_per_parent=2, parents_per_child=2))
    with pytest.raises(ValueError, match="parents_per_child = 99"):
        plant_dictionary(coupled_config(parents_per_child=99))
    # a planted.npz written before parents_per_child holds one parent per feature: read as one column
    old = again.to_bytes()
    legacy = dict(np.load(io.BytesIO(old)))
    legacy["parents"] = legacy["parents"][:, 0]
    buf = io.BytesIO()
    np.savez(buf, **legacy)
    assert (PlantedDictionary.from_bytes(buf.getvalue()).parents == again.parents).all()
    assert sample_activations(again, cfg, 8, np.random.default_rng(1)).shape == (8, 128)


def test_a_bad_synthetic_config_is_one_config_error_line_from_the_cli(tmp_path, capsys):
    from crosscoder.cli import main

    config = tmp_path / "bad.toml"
    config.write_text("[synthetic]\nchat_only_parent_fraction = 2.0\n")
    assert main(["synthetic", "--config", str(config), "--run", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "chat_only_parent_fraction must be in [0, 1], got 2.0" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "shards" / "manifest.json").exists()
