"""The pipeline through the CLI: one config check before any work, finished stages skipped on a re-run,
and the shard layer importable without torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crosscoder.cli import main

SYNTHETIC = Path(__file__).resolve().parents[1] / "launch" / "configs" / "synthetic.toml"
SMALL = ["--synthetic.tokens", "4096", "--synthetic.seq_len", "64", "--synthetic.samples_per_shard", "16",
         "--train.latents", "64", "--train.batch_size", "256", "--train.steps", "6", "--train.checkpoint_every", "3",
         "--analyze.tokens", "1024", "--quiet"]


@pytest.mark.parametrize("override, message", [
    (["--train.latents", "-5"], "train.latents must be at least 1, got -5"),
    (["--train.k", "0"], "train.k must be at least 1, got 0"),
    (["--train.k", "100"], r"train.k \(100\) must be at most train.latents \(64\)"),
    (["--train.batch_size", "0"], "train.batch_size must be at least 1, got 0"),
    (["--train.lr", "0"], "train.lr must be more than 0, got 0.0"),
    (["--train.threshold_momentum", "1"], r"train.threshold_momentum must be in \[0, 1\), got 1.0"),
    (["--train.arch", "causal"], "--train.arch must be acausal or aligned, got 'causal'"),
    (["--train.zero_stage", "4"], "--train.zero_stage must be 0, 1, 2 or 3, got 4"),
    (["--train.activation", "jump"], "--train.activation must be relu, topk, batchtopk or jumprelu, got 'jump'"),
    (["--train.jumprelu_bandwidth", "0"], "train.jumprelu_bandwidth must be more than 0, got 0.0"),
    (["--train.workers", "3", "--train.latent_parallel", "2"],
     r"train.latent_parallel=2 must divide the number of workers \(3\)"),
    (["--train.workers", "2", "--train.latent_parallel", "2", "--train.latents", "63", "--train.k", "4"],
     r"train.latents \(63\) must be divisible by train.latent_parallel \(2\)"),
    (["--train.latent_parallel", "2"], "train.latent_parallel=2 needs train.workers > 0"),
    (["--train.precision", "bf16"], r"train.precision=bf16 needs train.workers > 0 .*--train.workers 1"),
    (["--train.workers", "2", "--train.batch_size", "255"],
     r"train.batch_size \(255\) must be divisible by the 2 data-parallel ranks"),
    (["--train.data_partitions", "3"], r"train.batch_size \(256\) must be divisible by the 3 data partitions"),
    (["--train.workers", "2", "--train.data_partitions", "3"],
     r"train.data_partitions \(3\) must be a multiple of the data-parallel size \(2\)"),
    (["--harvest.hooks", '["model.layers.1", "model..x"]'], "harvest.hooks: 'model..x' is not a module path"),
    (["--harvest.hooks", "[]"], "harvest.hooks is empty"),
    (["--harvest.models", '[{path = "m", hooks = ["model.layers.3", "lm head"]}]'],
     r"harvest.models\[0\].hooks: 'lm head' is not a module path"),
    (["--harvest.models", '[{path = "m", hooks = []}]'], r"harvest.models\[0\].hooks is empty: name at least one module path"),
    (["--harvest.hooks", '["model.layers.1", "model.layers.1"]'], "harvest.hooks names a module twice"),
    (["--harvest.seq_len", "1"], "harvest.seq_len must be at least 2, got 1"),
    (["--harvest.models", '[{path = "m", dtype = "int8"}]'], r"harvest.models\[0\].dtype must be float32, bfloat16 or float16"),
    (["--harvest.models", '[{path = "m"}, {path = "n"}, {name = "model1", path = "o"}]'],
     "harvest.models: names must be unique"),
    (["--harvest.models", '[{name = "base"}]'], r"harvest.models\[0\]: needs 'path'"),
    (["--harvest.models", '[{path = "m", device_map = "gpu"}]'],
     r"harvest.models\[0\].device_map must be auto, balanced, balanced_low_0 or sequential, a device"),
    (["--harvest.models", '[{path = "m", max_memory = {0 = "20GiB"}}]'],
     r"harvest.models\[0\].max_memory must be a table .* with a device_map"),
    (["--synthetic.shared_fraction", "0.9"], "synthetic class fractions must sum to 1"),
    (["--analyze.sources", '["chat", "chat"]'], r"analyze.sources names the two compared sources"),
    (["--analyze.exclusive_threshold", "0.5"], r"analyze.exclusive_threshold must be in \(0, 0.5\), got 0.5"),
    (["--harvest.tiny_models", "true"], "override --harvest.tiny_models: renamed --harvest.demo_pair"),
    (["--train.lr", "inf"], "train.lr must be a finite number, got inf"),
    (["--harvest.cpus_per_actor", "inf"], "harvest.cpus_per_actor must be a finite number, got inf"),
    (["--train.seed", "-1"], r"train.seed must be in \[0, 9223372036854775807\], got -1"),
    (["--synthetic.seed", "-1"], r"synthetic.seed must be in \[0, 9223372036854775807\], got -1"),
    (["--synthetic.raw_scale", "[0, 1]"], "synthetic.raw_scale needs one positive scale per source"),
    (["--nmae", "x"], "unexpected argument '--nmae'; overrides look like --train.k 64"),
    (["other.toml"], "unexpected argument 'other.toml': a config file is given as --config other.toml"),
])
def test_every_config_mistake_is_one_line_before_any_work(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert main(["run", "--config", str(SYNTHETIC), "--run", str(run), *SMALL, *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crosscoder: config error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not run.exists()  # nothing written: no shards, no run directory


def test_version_names_this_release_and_its_libraries_on_one_line():
    """`crosscoder --version` (for a bug report): the installed release (pyproject.toml's version, which
    crosscoder.__version__ must repeat) and the versions of the libraries a run depends on, on one line
    however narrow the terminal, without importing them."""
    from importlib import metadata

    import crosscoder

    env = {**os.environ, "COLUMNS": "40"}
    code = ("import sys\nfrom crosscoder.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as end:\n"
            "    print('exit', end.code, *sorted({'torch', 'ray', 'deepspeed', 'transformers'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    line, end = proc.stdout.splitlines()
    assert end == "exit 0"  # and none of the four imported
    assert metadata.version("crosscoder") == crosscoder.__version__
    assert line.startswith(f"crosscoder {crosscoder.__version__} (Python {sys.version.split()[0]}, ")
    for package in ("torch", "ray", "deepspeed", "transformers"):
        assert f"{package} {metadata.version(package)}" in line, line


@pytest.mark.parametrize("command, overridable", [("run", True), ("train", True), ("analyze", True),
                                                   ("harvest", True), ("synthetic", True), ("tiny", False)])
def test_a_commands_help_says_how_to_override_a_config_key(capsys, command, overridable):
    """`crosscoder run --help` is where a newcomer looks for how to change the steps: the commands that
    read a config say that any key is a flag and where they are listed; `tiny`, which takes none, does not."""
    with pytest.raises(SystemExit) as end:
        main([command, "--help"])
    assert end.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    said = ("Any config key can be overridden: --train.k 64, --synthetic.tokens=100000, --synthetic.widths '[64, 96]' "
            "(a list of one: --harvest.hooks model.layers.13). 'crosscoder keys' lists them all.")
    assert (said in shown) == overridable, shown


def test_crosscoder_alone_lists_the_commands(capsys):
    """A newcomer's first try, `crosscoder` with nothing after it, shows every command with what it does
    (argparse alone said only that a command is required), and exits 2 as a usage error."""
    assert main([]) == 2
    shown = " ".join(capsys.readouterr().err.split())
    for command in ("harvest", "train", "analyze", "run", "keys", "compare", "export", "validate"):
        assert f" {command} " in shown, shown
    assert "every stage in order; with no arguments, the embedded default" in shown and "'crosscoder keys'" in shown


def test_a_renamed_key_in_a_file_names_its_new_name(tmp_path, capsys):
    config = tmp_path / "old.toml"
    config.write_text("[harvest]\ntiny_models = true\n")
    assert main(["run", "--config", str(config), "--run", str(tmp_path / "run")]) == 2
    assert "harvest.tiny_models was renamed harvest.demo_pair" in capsys.readouterr().err


def test_a_finished_one_process_run_is_skipped_on_a_rerun(tmp_path, capsys):
    """train.workers = 0: the second run neither trains nor analyses again (the distributed path:
    tests/test_run_default.py); raising train.steps continues from the checkpoint. The run directory
    is given as the RayJob gives it, with {name} for the config's name."""
    run = tmp_path / "synthetic"
    args = ["run", "--config", str(SYNTHETIC), "--run", str(tmp_path / "{name}"), *SMALL]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "step 6:" in first and "analyze: " in first and "skipping" not in first
    assert "dead n/a (counted from 200,000 tokens, train.dead_tokens)" in first  # 6 × 256 tokens trained
    export = run / "crosscoder" / "model.safetensors"
    stamp, report = export.stat().st_mtime_ns, (run / "analysis" / "report.html").stat().st_mtime_ns
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "already complete" in again and "already trained to step 6, skipping" in again
    assert "describes the export (step 6), skipping" in again
    assert export.stat().st_mtime_ns == stamp and (run / "analysis" / "report.html").stat().st_mtime_ns == report
    # moved elsewhere (archived, fetched from a cluster), it is still finished there: it read the export's
    # old path from train_result.json, found nothing, and exported and analysed again
    moved = run.rename(tmp_path / "moved")
    assert main(["run", "--config", str(SYNTHETIC), "--run", str(moved), *SMALL]) == 0
    there = capsys.readouterr().out
    assert "already trained to step 6, skipping" in there and "describes the export (step 6), skipping" in there, there
    assert f"crosscoder exported to {moved / 'crosscoder'} " in there and "resuming" not in there
    assert (moved / "crosscoder" / "model.safetensors").stat().st_mtime_ns == stamp
    # its config.toml names the shards where they were: they are read where they are now (relocation.py)
    assert main(["analyze", str(moved), "--quiet"]) == 0
    assert f"analysis: {moved / 'analysis' / 'latents.csv'}" in capsys.readouterr().out
    # a run whose train_result.json records no absolute directory (trained before it did): said how to read them
    result = json.loads((moved / "train_result.json").read_text())
    assert result["run_dir"] == str(run)  # where it was trained
    (moved / "train_result.json").write_text(json.dumps(result | {"run_dir": "synthetic"}))
    assert main(["analyze", str(moved), "--quiet"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"; {moved / 'shards'} holds shards: `--data {moved / 'shards'}` analyses those (was the run directory moved?)")
    assert main(["analyze", str(moved), "--data", str(moved / "shards"), "--quiet"]) == 0
    (moved / "train_result.json").write_text(json.dumps(result))
    # copied (new file times, the export's maybe newer than the report): analysed there too; it was
    # analysed again, the file times read as an export trained after its analysis
    copy = Path(shutil.copytree(moved, tmp_path / "copy", copy_function=shutil.copy))
    os.utime(copy / "crosscoder" / "model.safetensors")
    assert main(["run", "--config", str(SYNTHETIC), "--run", str(copy), *SMALL, "--quiet"]) == 0
    assert "describes the export (step 6), skipping" in capsys.readouterr().out
    # trained again from scratch to as many steps (another seed, its checkpoints deleted): the analysis is another
    # dictionary's, said by compare and redone by a run (the steps alone took it for this one's)
    shutil.rmtree(copy / "checkpoints")
    (copy / "train_result.json").unlink()
    assert main(["train", "--run", str(copy), "--data", str(copy / "shards"), "--train.seed", "7", "--quiet"]) == 0
    assert main(["compare", str(copy)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"older than the crosscoder it describes: the analysis of {copy} (retrained since); ")
    assert main(["run", "--config", str(SYNTHETIC), "--run", str(copy), *SMALL, "--train.seed", "7"]) == 0
    again = capsys.readouterr().out
    assert "already trained to step 6, skipping" in again and "describes the export" not in again, again
    assert f"report: {copy / 'analysis' / 'report.html'}" in again
    assert main(["compare", str(copy)]) == 0 and "older than" not in capsys.readouterr().out
    moved.rename(run)
    assert main([*args, "--train.steps", "9"]) == 0
    more = capsys.readouterr().out
    assert "step 9:" in more and "analyze: " in more and "describes the export" not in more
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # each step logged once
    # another dictionary on this run directory is refused before the data stage (a harvest of hours
    # before it, otherwise): nothing is written to the data root it names
    assert main([*args, "--train.latents", "128", "--synthetic.output", str(tmp_path / "other-shards")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"crosscoder: RunDirError: {run}: its checkpoint was trained with latents=64; this config asks for "
        f"latents=128; use another --run directory or delete {run / 'checkpoints'}")
    assert not (tmp_path / "other-shards").exists()
    # and by `crosscoder train` before Ray Train starts its workers (it said so from a worker)
    assert main(["train", "--run", str(run), "--train.latents", "128", "--train.workers", "2", "--train.latent_parallel",
                 "2", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert err.strip().endswith("latents=128; use another --run directory or delete " + str(run / "checkpoints")), err
    assert "train.device" not in out + err and "Ray" not in out + err, (out, err)


def test_run_without_a_config_reruns_and_extends_a_run_directory_with_its_own(tmp_path, capsys):
    """`crosscoder run --run DIR` with no --config reads DIR's config.toml, as train and analyze do. It
    took the embedded default (another dictionary) and was refused."""
    run = tmp_path / "mine"
    assert main(["run", "--config", str(SYNTHETIC), "--run", str(run), *SMALL]) == 0
    capsys.readouterr()
    assert main(["run", "--run", str(run), "--quiet"]) == 0
    again = capsys.readouterr().out
    assert "already trained to step 6, skipping" in again and "describes the export (step 6), skipping" in again
    assert main(["run", "--run", str(run), "--train.steps", "8", "--quiet"]) == 0
    more = capsys.readouterr().out
    assert f"train: resuming {run} from step 6 of 8" in more and "step 8:" in more and "analyze: " in more, more


def test_train_without_a_config_continues_the_run_in_its_default_directory(tmp_path, capsys, monkeypatch):
    """After `crosscoder run` (runs/<name>), `crosscoder train --train.steps N` with no --config and no
    --run continues that run from its own config.toml. It took the package's defaults instead (another
    dictionary), was refused, and had overwritten the run's config.toml with them on the way."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", str(SYNTHETIC), *SMALL, "--name", "default"]) == 0
    saved = (tmp_path / "runs" / "default" / "config.toml").read_text()
    capsys.readouterr()
    assert main(["train", "--train.steps", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"train: resuming {tmp_path / 'runs' / 'default'} from step 6 of 8" in out and "step 8:" in out
    # more steps move the schedule (lr 1e-2, 20 warm-up steps, the last 20% decaying): the run says so (step 6
    # decayed in a 6-step run; step 7 warming up, not yet decaying, in an 8-step one), and its log goes on with it
    assert "train: the learning-rate schedule changed (train.steps 6 -> 8): step 7 runs at 0.0035, step 6 ran at " \
        "0.003\n" in out
    logged = [json.loads(line) for line in (tmp_path / "runs" / "default" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["lr"], 9)) for r in logged if r["step"] in (6, 8)] == [(6, 0.003), (8, 0.004)]
    assert (tmp_path / "runs" / "default" / "config.toml").read_text() == saved.replace("steps = 6", "steps = 8")
    # the run directory as a word of its own, as `export` takes it, anywhere among the overrides
    assert main(["train", "--train.steps", "10", "runs/default", "--quiet"]) == 0
    assert f"train: resuming {tmp_path / 'runs' / 'default'} from step 8 of 10" in capsys.readouterr().out
    assert main(["analyze", "runs/default", "--quiet"]) == 0
    assert f"report: {tmp_path / 'runs' / 'default' / 'analysis' / 'report.html'}" in capsys.readouterr().out
    assert main(["analyze", "runs/default", "--run", "runs/other"]) == 2
    assert capsys.readouterr().err == "crosscoder: config error: two run directories given: runs/default and --run " \
        "runs/other\n"


def test_train_without_any_config_says_it_takes_the_package_defaults(tmp_path, capsys):
    """Neither --config nor a config.toml in the run directory: the dataclass defaults (4096 latents,
    1000 steps), not the demo's, which a newcomer who ran `crosscoder run` first does not expect."""
    assert main(["train", "--run", str(tmp_path / "new"), "--data", str(tmp_path / "none"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert not (tmp_path / "new").exists()  # the run directory it made for its lock is gone with the failure
    (tmp_path / "mine").mkdir()
    assert main(["train", "--run", str(tmp_path / "mine"), "--data", str(tmp_path / "none"), "--quiet"]) == 1
    assert (tmp_path / "mine").is_dir()  # one the command did not make stays
    capsys.readouterr()
    assert f"train: no --config and no {tmp_path / 'new' / 'config.toml'}: the package's defaults (`crosscoder keys` " \
        "lists them)" in out, out
    assert main(["train", "--config", str(SYNTHETIC), "--run", str(tmp_path / "new"), "--data", str(tmp_path / "none"),
                 "--quiet"]) == 1
    assert "package's defaults" not in capsys.readouterr().out
    # a config error is still its one line, and the only one
    assert main(["train", "--run", str(tmp_path / "new"), "--data", str(tmp_path / "none"), "--train.k", "0"]) == 2
    said = capsys.readouterr()
    assert len(said.err.strip().splitlines()) == 1 and said.out == ""


def test_a_finished_run_whose_shards_were_removed_is_not_made_again(tmp_path, capsys):
    """Shards are large, and a run trained and analysed needs them no more. A re-run of `crosscoder
    run` then made every shard again (hours on real data) only to skip training and the analysis, and
    `crosscoder train` stopped on the missing manifest. Now both skip; a changed setting that needs
    the data (more steps) makes it again."""
    import shutil

    from crosscoder.config import load_config

    run = tmp_path / "synthetic"
    args = ["run", "--config", str(SYNTHETIC), "--run", str(run), *SMALL]
    assert main(args) == 0
    shards = Path(load_config(run / "config.toml").train.data)
    capsys.readouterr()
    shutil.rmtree(shards)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"is trained (step 6) and analysed; its shards ({shards}) were removed and are not made again" in out
    assert "step 6:" in out and f"run directory: {run}" in out and not shards.exists()
    assert main(["train", "--config", str(SYNTHETIC), "--run", str(run), *SMALL]) == 0
    assert "already trained to step 6; its shards" in capsys.readouterr().out and not shards.exists()
    assert main(["train", "--config", str(SYNTHETIC), "--run", str(run), *SMALL, "--train.latents", "32"]) == 1
    assert "ManifestMissing" in capsys.readouterr().err  # another dictionary: it needs the data
    assert main([*args, "--train.steps", "9"]) == 0
    assert "step 9:" in capsys.readouterr().out and (shards / "manifest.json").is_file()


def test_the_shard_layer_loads_without_torch():
    code = ("import sys; import crosscoder.shards, crosscoder.storage, crosscoder.stream, crosscoder.faults, "
            "crosscoder.hub_access; "
            "print('torch' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


DISPATCH = """
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
from crosscoder.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_analysis_goes_to_a_gpu_of_the_ray_cluster_when_this_process_has_none(tmp_path):
    """A job's driver often runs on a CPU head node: with GPUs in the Ray cluster, the analysis runs
    as a Ray task on one of them. Here the cluster declares one GPU (no CUDA behind it), so the task
    is scheduled on it and, finding no CUDA, analyses on the CPU."""
    run = tmp_path / "run"
    args = ["run", "--config", str(SYNTHETIC), "--run", str(run), *SMALL]
    proc = subprocess.run([sys.executable, "-c", DISPATCH, *args], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "analyze: on a GPU of the Ray cluster" in proc.stdout
    assert "analyze: 1024 tokens;" in proc.stdout and (run / "analysis" / "report.html").is_file()


@pytest.mark.parametrize("path, message", [
    ("{tmp}/tiny-models/no-such-model", "model directory {tmp}/tiny-models/no-such-model does not exist"),
    ("tiny-models/no-such-model", "model directory {tmp}/tiny-models/no-such-model does not exist"),
    ("./no-such-model", "model directory {tmp}/no-such-model does not exist"),
    ("a/b/c", "model directory {tmp}/a/b/c does not exist"),
    ("nobody/no-such-model", "'nobody/no-such-model' is not a local directory and the Hugging Face hub is offline"),
    ("nobody/no-such-model", "'nobody/no-such-model' is not a local directory and the Hugging Face hub cannot be "
                             "reached (hub.invalid: "),
])
def test_a_missing_model_is_one_line_without_any_network_attempt(tmp_path, capsys, monkeypatch, path, message):
    """A path that looks local and is not there is named as a missing directory, before transformers
    or the hub is asked anything; a hub id while offline says the hub is offline, and one whose
    hub's host name does not resolve (an air-gapped cluster) says so, without huggingface_hub's
    five retries."""
    import huggingface_hub
    import transformers

    from crosscoder import hub_access

    def no_network(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args[:1]}")

    for name in ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    if "cannot be reached" in message:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # RFC 6761: never resolves
        for proxy in hub_access.PROXY_VARIABLES:
            monkeypatch.delenv(proxy, raising=False)
        monkeypatch.setattr(hub_access, "_lookups", {})  # this test's lookups only, gone after it
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-models").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[harvest]\nmodels = [{{name = "base", path = "{path.format(tmp=tmp_path)}"}}]\n'
                      f'data = "{tmp_path}/docs.jsonl"\n')
    assert main(["harvest", "--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crosscoder: ModelError: "), err
    assert message.format(tmp=tmp_path) in err[0], err


def test_the_hubs_reachability_is_looked_up_again_after_a_minute(monkeypatch):
    """A long-lived process (a notebook) whose network comes back sees it once the answer is a
    minute old; before that, every load reuses the one lookup."""
    import huggingface_hub

    from crosscoder import hub_access

    for proxy in hub_access.PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(hub_access, "_lookups", {})
    now, lookups, real_look_up = [1000.0], [], hub_access._look_up
    monkeypatch.setattr(hub_access, "_clock", lambda: now[0])

    def as_if_the_network_came_back(host, port):  # .invalid never resolves: localhost stands in later
        lookups.append(host)
        return real_look_up("localhost" if len(lookups) > 1 else host, port)

    monkeypatch.setattr(hub_access, "_look_up", as_if_the_network_came_back)
    assert hub_access.hub_unresolvable().startswith("cannot be reached (hub.invalid: ")
    now[0] += hub_access.LOOKUP_LIFETIME_S - 1
    assert hub_access.hub_unresolvable().startswith("cannot be reached") and lookups == ["hub.invalid"]
    now[0] += 1
    assert hub_access.hub_unresolvable() == "" and len(lookups) == 2
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the proxy resolves the name: no lookup
    assert hub_access.hub_unresolvable() == "" and len(lookups) == 2


def test_a_missing_organism_gguf_is_one_line(tmp_path, capsys):
    """An error the user can fix in a stage the CLI's list did not name (the organism's) is one line too:
    every such error derives from errors.CrosscoderError, which the CLI catches."""
    gguf = tmp_path / "no-such.gguf"
    code = main(["run", "--run", str(tmp_path / "run"), "--organism.directory", str(tmp_path / "organism"),
                 "--organism.gguf", str(gguf), "--harvest.demo_pair", "false", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"crosscoder: OrganismError: organism.gguf: {gguf} does not exist"], err


def test_every_error_the_user_can_fix_is_one_the_cli_prints_as_one_line():
    """Each exception class the package raises for a user's file, setting, shard, model or run derives
    from CrosscoderError; the only others are internal signals that never reach the user as an error."""
    import importlib
    import inspect
    import pkgutil

    import crosscoder
    from crosscoder.errors import CrosscoderError

    internal = {"ConfigError",  # its own line: "crosscoder: config error: …", exit 2
                "TrainingStopped",  # one rank following another's stop; the stopping rank raises the cause
                "Interrupted",  # Ctrl-C: a KeyboardInterrupt, exit 130
                "_Done"}  # language_models: stops a forward pass after the deepest hook
    found = {}
    for module in pkgutil.iter_modules(crosscoder.__path__):
        mod = importlib.import_module(f"crosscoder.{module.name}")
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[name] = obj
    assert {"ShardError", "OrganismError", "HubError", "DataExhausted", "TrainingDiverged"} <= set(found)
    stray = sorted(n for n, c in found.items() if not issubclass(c, CrosscoderError) and n not in internal)
    assert not stray, f"derive these from errors.CrosscoderError (or list them as internal): {stray}"


def test_a_harvest_without_models_is_one_line(tmp_path, capsys):
    """`crosscoder harvest` with no models listed and no demo pair says what to set (it was a traceback
    about an empty harvest.output)."""
    code = main(["harvest", "--run", str(tmp_path / "run"), "--harvest.demo_pair", "false", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("crosscoder: HarvestError: no models to harvest"), err


@pytest.mark.parametrize("fmt", ["dictionary_learning", "neuronpedia"])
def test_exporting_a_run_without_an_export_is_one_line(tmp_path, capsys, fmt):
    """A run directory with no crosscoder export is named as such (the dictionary_learning export took
    '<run>/crosscoder' for a Hub repo id and blamed the network; the dashboards asked for --data)."""
    run = tmp_path / "untrained"
    run.mkdir()
    code = main(["export", str(run), "--format", fmt])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"crosscoder: ExportError: {run}/crosscoder: no crosscoder export; train the run "
                                 "first"], err


def test_export_and_push_take_the_run_directory_as_train_does(tmp_path, capsys):
    """`export` and `push` take the run directory positionally or by `--run`, as train and analyze
    take it (`--run` was an unrecognized argument); two different ones, or none, is one line."""
    run = tmp_path / "untrained"
    run.mkdir()
    assert main(["export", "--run", str(run)]) == 1
    assert capsys.readouterr().err.strip() == f"crosscoder: ExportError: {run}/crosscoder: no crosscoder export; " \
        "train the run first"
    assert main(["push", "--run", str(run), "me/tiny", "--save-to", str(tmp_path / "out")]) == 1
    assert "not a crosscoder export" in capsys.readouterr().err
    assert main(["export", str(run), "--run", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip() == f"crosscoder: config error: two run directories given: {run} and " \
        f"--run {tmp_path / 'other'}"
    assert main(["export"]) == 2
    assert "crosscoder export needs the run directory" in capsys.readouterr().err


def test_every_module_is_in_the_readme_table_and_the_architecture():
    """The README's table of what is here and docs/architecture.md's layers name every module of the
    package, so neither falls behind the tree."""
    repo = Path(__file__).resolve().parents[1]
    modules = sorted(p.name for p in (repo / "crosscoder").glob("*.py") if p.name != "__init__.py")
    for doc in ("README.md", "docs/architecture.md"):
        text = (repo / doc).read_text()
        missing = [m for m in modules if f"{m}`" not in text]
        assert not missing, f"{doc} does not name {missing}"


def test_a_closed_pipe_ends_the_listing_quietly():
    """`crosscoder keys | head` (the reader gone before the listing ends) prints no traceback."""
    read, write = os.pipe()
    os.close(read)  # every write fails: the reader has already gone
    done = subprocess.run([sys.executable, "-m", "crosscoder.cli", "keys"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=60)
    os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr


@pytest.mark.parametrize("command, resumes", [("harvest", "resume from the shards already committed"),
                                              ("train", "resume from the last checkpoint"),
                                              ("analyze", "start it again")])
def test_an_interrupted_command_says_how_it_resumes(tmp_path, capsys, monkeypatch, command, resumes):
    """Ctrl-C ends a command with one line (exit 130) that says what a re-run continues from: a harvest
    keeps its committed shards (it has no checkpoint), training its last checkpoint; an analysis
    (which said 'resume from the last checkpoint') starts again."""
    import crosscoder.pipeline as pipeline

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, command, pressed)
    (tmp_path / "run").mkdir()  # analyze reads a run directory that exists
    code = main([command, "--run", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == [f"crosscoder: interrupted; re-run the same command to {resumes}"], err


@pytest.mark.parametrize("argv, refused", [
    (["validate", "s3://bucket/x", "--storage.endpoint_url", "http://127.0.0.1:9"],
     "--storage.endpoint_url http://127.0.0.1:9"),
    (["keys", "--train.k", "4"], "--train.k 4"), (["compare", "runs/a", "--quiet"], "--quiet"),
    (["tiny", "--config", "x.toml"], "--config x.toml")])
def test_a_command_without_a_config_refuses_what_it_does_not_take(capsys, argv, refused):
    """`validate` reads its endpoint from --endpoint-url; a config override given to it (or to another
    command that reads no config) was ignored silently, and validate went to AWS instead."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crosscoder {argv[0]}: unrecognized arguments: {refused} ("), err


def test_tiny_refuses_a_width_its_attention_heads_cannot_split(tmp_path, capsys):
    assert main(["tiny", "--output", str(tmp_path / "tiny"), "--hidden", "30"]) == 2
    assert "--hidden must be a positive multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_a_synthetic_root_with_a_shard_gone_is_written_again_and_one_of_another_config_is_refused(tmp_path, capsys):
    """Kept synthetic data must be this config's and whole: a deleted shard (as `validate --full`
    advises for a bad one) is written again, the same bytes, and a root of other synthetic settings
    is one line naming them, not silently trained on (a harvest's root is refused the same way)."""
    shards = tmp_path / "shards"
    args = ["synthetic", "--config", str(SYNTHETIC), "--run", str(tmp_path / "run"), "--synthetic.output", str(shards),
            *SMALL]
    assert main(args) == 0
    gone = shards / "shard-000002.tar"
    before = gone.read_bytes()
    gone.unlink()
    run = ["run", "--config", str(SYNTHETIC), "--run", str(tmp_path / "run"), "--synthetic.output", str(shards), *SMALL]
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "shard-000002.tar (missing)" in out and "writing the synthetic data again" in out
    assert gone.read_bytes() == before
    assert main([*run, "--synthetic.features", "128"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"crosscoder: ShardError: {shards}: holds synthetic data of another config "
                          "(synthetic.features = 256 there, 128 here)"), err


def test_a_config_that_names_another_runs_shards_trains_on_them_as_they_are(tmp_path, monkeypatch, capsys):
    """The shipped L1 configs train on the shards of the BatchTopK run they are compared with
    (`train.data = "runs/synthetic/shards"`; demo-l1.toml names the demo's harvested shards). Those
    were refused as "synthetic data of another config" / "harvested shards, not synthetic data",
    since the L1 config's own [synthetic] table is the default one; a root the config names as its
    training data is now trained on as it is, harvested or synthetic."""
    import shutil

    from crosscoder.shards import read_manifest, write_manifest
    from crosscoder.storage import Root

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", str(SYNTHETIC), *SMALL]) == 0  # writes runs/synthetic/shards
    shards = tmp_path / "runs" / "synthetic" / "shards"
    before = {f.name: f.stat().st_mtime_ns for f in shards.iterdir()}
    l1 = SYNTHETIC.with_name("synthetic-l1.toml")
    capsys.readouterr()
    train_small = ["--train.latents", "64", "--train.batch_size", "256", "--train.steps", "6",
                   "--train.checkpoint_every", "3", "--train.l1_warmup_steps", "3", "--analyze.tokens", "1024", "--quiet"]
    assert main(["run", "--config", str(l1), *train_small]) == 0
    out = capsys.readouterr().out
    assert f"shards: {shards} holds synthetic data of another config (" in out and "step 6:" in out
    assert {f.name: f.stat().st_mtime_ns for f in shards.iterdir()} == before  # nothing written there
    assert main(["compare", "runs/synthetic", "runs/synthetic-l1"]) == 0
    assert "relu" in capsys.readouterr().out
    # a harvested dataset (a manifest without the generator's record) named by --data
    harvested = tmp_path / "harvested"
    shutil.copytree(shards, harvested)
    manifest = read_manifest(Root(str(harvested)))
    del manifest.extra["synthetic"]
    write_manifest(Root(str(harvested)), manifest)
    assert main(["run", "--config", str(l1), "--run", "runs/on-harvested", "--data", str(harvested), *train_small]) == 0
    assert f"shards: {harvested} holds harvested activations (" in capsys.readouterr().out
    # named as synthetic.output, the generator's target, it is still refused
    assert main(["run", "--config", str(SYNTHETIC), "--run", "runs/other", "--synthetic.output", str(harvested),
                 *SMALL]) == 1
    assert "holds harvested shards, not synthetic data" in capsys.readouterr().err


def test_a_moved_run_reads_what_it_recorded_inside_itself_where_it_is_now(tmp_path):
    """relocation.locator: only paths under the directory the run was trained in, and gone from there."""
    from crosscoder.relocation import locator

    old, new, elsewhere = tmp_path / "cluster" / "run", tmp_path / "laptop" / "run", tmp_path / "data"
    (new / "tiny").mkdir(parents=True)
    elsewhere.mkdir()
    assert locator(new)(str(old / "shards")) == str(old / "shards")  # no train_result.json: nothing known
    (new / "train_result.json").write_text(json.dumps({"run_dir": str(old), "steps": 1}))
    locate = locator(new)
    assert locate(str(old / "shards")) == str(new / "shards")
    assert locate(str(old / "tiny" / "base")) == str(new / "tiny" / "base")
    for kept in (str(elsewhere), str(tmp_path / "cluster" / "other"), "s3://bucket/run/shards", "HuggingFaceTB/x", ""):
        assert locate(kept) == kept
    (old / "shards").mkdir(parents=True)  # still where it was (a copy): read there
    assert locate(str(old / "shards")) == str(old / "shards")
    (new / "train_result.json").write_text(json.dumps({"run_dir": "runs/run", "steps": 1}))  # recorded relative
    assert locator(new)(str(tmp_path / "cluster" / "run" / "tiny")) == str(old / "tiny")


def test_a_manifest_names_its_models_where_its_root_is_now_and_a_harvest_compares_them_so(tmp_path):
    """relocation.shards_locator / shards_mover: a manifest's paths are anchored by the root it was written
    to, whatever the run directory's train_result.json says since (trained again after a move);
    a manifest without that record falls back to the run directory's. The mover (a harvest's comparison)
    moves a path still there too where the new folder holds its copy; the locator (reading) does not."""
    from crosscoder.relocation import shards_locator, shards_mover

    first, now = tmp_path / "cluster" / "run", tmp_path / "laptop" / "run"
    (now / "tiny" / "base").mkdir(parents=True)
    (now / "train_result.json").write_text(json.dumps({"run_dir": str(now), "steps": 2}))  # trained here since
    locate = shards_locator(now / "shards", str(first / "shards"))
    assert locate(str(first / "tiny" / "base")) == str(now / "tiny" / "base")
    assert locate(str(tmp_path / "models" / "base")) == str(tmp_path / "models" / "base")  # outside: as recorded
    assert shards_locator(now / "shards", str(now / "shards"))(str(first / "tiny" / "base")) == \
        str(first / "tiny" / "base")  # written here: nothing moved
    # no record (a manifest written before it): where the run directory says it was trained
    assert shards_locator(now / "shards", None)(str(first / "tiny" / "base")) == str(first / "tiny" / "base")
    (now / "train_result.json").write_text(json.dumps({"run_dir": str(first), "steps": 1}))
    assert shards_locator(now / "shards", None)(str(first / "tiny" / "base")) == str(now / "tiny" / "base")
    # a copy: the original is still there; reading keeps it, comparing takes the copy's own where it has one
    (first / "tiny" / "base").mkdir(parents=True)
    (first / "tiny" / "chat").mkdir()
    assert shards_locator(now / "shards", str(first / "shards"))(str(first / "tiny" / "base")) == \
        str(first / "tiny" / "base")
    move = shards_mover(now / "shards", str(first / "shards"))
    assert move(str(first / "tiny" / "base")) == str(now / "tiny" / "base")
    assert move(str(first / "tiny" / "chat")) == str(first / "tiny" / "chat")  # the copy has none: as recorded
