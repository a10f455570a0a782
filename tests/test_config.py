import os

import pytest

from crosscoder.cli import _split_overrides, main
from crosscoder.config import ConfigError, RunConfig, apply_overrides, dumps_toml, load_config


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_typed_config_and_name_defaults_to_file_stem(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nk = 64\nlr = 1\nlatents = 1_000\n", "my-run.toml"))
    assert cfg.name == "my-run"
    assert cfg.train.k == 64 and cfg.train.latents == 1000
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "[train]\nlattents = 5\n")
    with pytest.raises(ConfigError, match=r"c\.toml: train: unknown key 'lattents'"):
        load_config(p)


def test_an_unknown_key_names_the_nearest_one_or_the_table_that_has_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown keys 'lattents', 'workerz' \('lattents': did you mean 'latents'\?; "
                                          r"'workerz': did you mean 'workers'\?\); known keys: data, "):
        load_config(write(tmp_path, "[train]\nlattents = 5\nworkerz = 2\n"))
    with pytest.raises(ConfigError, match=r"--train\.port: unknown key 'port' \(did you mean metrics\.port\?\)"):
        apply_overrides(RunConfig(), [("train.port", "9000")])
    with pytest.raises(ConfigError, match=r"--trian\.k: unknown key 'trian' \(did you mean 'train'\?\)"):
        apply_overrides(RunConfig(), [("trian.k", "3")])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; known keys"):  # nothing near: no guess
        apply_overrides(RunConfig(), [("train.zzz", "3")])


def test_unknown_table_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, "[trian]\nk = 5\n"))
    with pytest.raises(ConfigError, match=r"train\.k: expected an integer"):
        load_config(write(tmp_path, '[train]\nk = "many"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_are_typed_and_checked():
    cfg = RunConfig()
    apply_overrides(cfg, _split_overrides(["--train.k", "64", "--train.lr=3e-4", "--synthetic.widths", "[32, 48]",
                                           "--name", "sweep-3"]))
    assert cfg.train.k == 64 and cfg.train.lr == 3e-4 and cfg.synthetic.widths == [32, 48] and cfg.name == "sweep-3"
    apply_overrides(cfg, [("train.data", "s3://bucket/x")])
    assert cfg.train.data == "s3://bucket/x"
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        apply_overrides(cfg, [("train.kk", "3")])
    with pytest.raises(ConfigError, match="--train.k: expected an integer"):
        apply_overrides(cfg, [("train.k", "lots")])
    with pytest.raises(ConfigError, match="needs a value"):
        _split_overrides(["--train.k"])
    # a list of one item may be given as the item alone; its type is still checked
    apply_overrides(cfg, [("harvest.hooks", "model.layers.13"), ("synthetic.raw_scale", "2.5")])
    assert cfg.harvest.hooks == ["model.layers.13"] and cfg.synthetic.raw_scale == [2.5]
    with pytest.raises(ConfigError, match=r"--synthetic.widths\[0\]: expected an integer, got 'wide'"):
        apply_overrides(cfg, [("synthetic.widths", "wide")])
    with pytest.raises(ConfigError, match="--harvest.models: expected a list"):
        apply_overrides(cfg, [("harvest.models", "base")])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = RunConfig(name="rt")
    apply_overrides(cfg, [("train.k", "7"), ("synthetic.raw_scale", "[2.0, 0.5]")])
    path = write(tmp_path, dumps_toml(cfg), "rt.toml")
    assert load_config(path) == cfg


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    p = write(tmp_path, "[train]\nbogus = 1\n")
    assert main(["train", "--config", str(p), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err


def test_a_rule_broken_by_keys_a_config_file_set_names_that_file(tmp_path, capsys):
    """A range or a rule between keys names the file its keys were set in, as a wrong type does:
    the file given, or a run directory's saved config.toml (which a rule added since may refuse);
    a key also set on the command line is the user's own, named as typed."""
    given = write(tmp_path, "[train]\nk = 0\nlatents = 64\n")
    run = tmp_path / "saved"
    run.mkdir()
    (run / "config.toml").write_text('name = "saved"\n[train]\nprecision = "bf16"\nworkers = 0\n')
    cases = [(["--config", str(given)], f"{given}: train.k must be at least 1, got 0"),
             (["--config", str(given), "--train.k", "0"], "train.k must be at least 1, got 0"),
             (["--config", str(given), "--train.k", "128"], "train.k (128) must be at most train.latents (64) "
                                                           f"(train.latents set in {given})"),
             (["--run", str(run)], f"{run / 'config.toml'}: train.precision=bf16 needs train.workers > 0")]
    for args, message in cases:
        assert main(["train", *args, "--data", str(tmp_path / "none")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"crosscoder: config error: {message}") and len(err.splitlines()) == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "saved"]  # no run directory made
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


def test_cli_keys_lists_documented_fields(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert "train.k" in out and "active latents per token" in out


def test_cli_turns_on_huge_page_tensors_unless_the_user_chose(monkeypatch, capsys):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["keys"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"  # inherited by the Ray processes it starts
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["keys"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_sparse_kernels_setting_resolves_by_dictionary_size():
    from crosscoder.config import ConfigError, TrainConfig, use_sparse_kernels, validate

    assert use_sparse_kernels(TrainConfig(latents=65536)) and not use_sparse_kernels(TrainConfig(latents=512))
    assert use_sparse_kernels(TrainConfig(latents=512, sparse_kernels="on"))
    assert not use_sparse_kernels(TrainConfig(latents=65536, sparse_kernels="off"))
    cfg = RunConfig()
    cfg.train.sparse_kernels = "yes"
    with pytest.raises(ConfigError, match="train.sparse_kernels must be on, off or auto, got 'yes'"):
        validate(cfg)


def test_every_launch_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(path)
        assert cfg.name and cfg.train.steps > 0, path  # loading raises on any unknown or mistyped key


def test_analyze_and_train_with_only_a_run_dir_use_that_runs_config(tmp_path):
    from crosscoder.cli import build_parser, resolve

    cfg = RunConfig()
    cfg.name, cfg.train.data, cfg.train.latents = "mine", "somewhere/shards", 4096
    (tmp_path / "config.toml").write_text(dumps_toml(cfg))
    for command in ("analyze", "train"):
        args, rest = build_parser().parse_known_args([command, "--run", str(tmp_path), "--train.k", "8"])
        resolved, run_dir = resolve(args, rest)
        assert run_dir == tmp_path and resolved.name == "mine" and resolved.train.data == "somewhere/shards"
        assert resolved.train.latents == 4096 and resolved.train.k == 8
