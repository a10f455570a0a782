"""The ``crosscoder`` command line: the only place that parses arguments.

Subcommands share one shape: ``--config FILE.toml``, ``--run DIR`` (default ``runs/<config name>``)
and dotted overrides of any config key (``--train.k 64`` or ``--train.k=64``). ``crosscoder run``
with no arguments runs the embedded default configuration end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from .config import ConfigError, RunConfig, apply_overrides, describe, load_config


def _split_overrides(rest: list[str]) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.k 64")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"override {arg} needs a value")
            key, value = arg[2:], rest[i + 1]
            i += 2
        out.append((key, value))
    return out


def default_config_path() -> Path:
    return Path(str(resources.files("crosscoder") / "configs" / "default.toml"))


def resolve(args, rest) -> tuple[RunConfig, Path]:
    """The config (``--config``; else, for ``train``/``analyze --run DIR``, the run's own
    config.toml; else the embedded default for ``run``) with overrides, and the run directory."""
    path = args.config or (default_config_path() if args.command == "run" else None)
    if path is None and args.run and args.command in ("train", "analyze") and (Path(args.run) / "config.toml").is_file():
        path = Path(args.run) / "config.toml"
    cfg = load_config(path)
    apply_overrides(cfg, _split_overrides(rest))
    run_dir = Path(args.run) if args.run else Path("runs") / cfg.name
    return cfg, run_dir


def cmd_synthetic(cfg: RunConfig, run_dir: Path, args) -> int:
    from .synthetic import write_synthetic

    from .storage import open_root

    output = args.output or cfg.synthetic.output or str(run_dir / "shards")
    manifest = write_synthetic(cfg.synthetic, output, progress=not args.quiet, root=open_root(output, cfg.storage))
    print(f"wrote {len(manifest.shards)} shards, {manifest.tokens} tokens, to {output}")
    return 0


def _use_tiny_models(cfg: RunConfig, run_dir: Path, quiet: bool = False) -> None:
    """Point the harvest at the demo base/chat pair and documents in <run>/tiny, made once."""
    from . import demo_pair

    where = run_dir / "tiny"
    if not demo_pair.is_made(where, steps=cfg.harvest.tiny_steps):
        print(f"tiny models: training a demo base model and its chat fine-tune in {where} "
              f"({cfg.harvest.tiny_steps} + {cfg.harvest.tiny_steps} steps)")
        demo_pair.make_demo_pair(where, steps=cfg.harvest.tiny_steps, progress=not quiet)
    if not (where / "documents.jsonl").is_file():
        print(f"tiny models: writing demo documents to {where / 'documents.jsonl'}")
        demo_pair.write_demo_documents(where / "documents.jsonl", n_docs=4000)
    cfg.harvest.models = [{"name": "base", "path": str(where / "base")}, {"name": "chat", "path": str(where / "chat")}]
    cfg.harvest.data = cfg.harvest.data or str(where / "documents.jsonl")


def cmd_harvest(cfg: RunConfig, run_dir: Path, args) -> int:
    from .harvest import harvest

    if cfg.harvest.tiny_models and not cfg.harvest.models:
        _use_tiny_models(cfg, run_dir, args.quiet)
    if not cfg.harvest.output:
        cfg.harvest.output = str(run_dir / "shards")
    manifest = harvest(cfg, progress=not args.quiet)
    print(f"harvested {manifest.tokens} tokens into {len(manifest.shards)} shards at {cfg.harvest.output}")
    return 0


def cmd_tiny(cfg: RunConfig, run_dir: Path, args) -> int:
    from . import tiny

    output = Path(args.output)
    base, chat = tiny.make_pair(output, hidden=args.hidden, layers=args.layers)
    docs = tiny.write_documents(output / "documents.jsonl", n_docs=args.documents)
    print(f"tiny base model: {base}\ntiny chat model: {chat}\ndocuments: {docs}")
    return 0


def training_data(cfg: RunConfig, run_dir: Path, override: str | None) -> str:
    return override or cfg.train.data or cfg.harvest.output or cfg.synthetic.output or str(run_dir / "shards")


def run_training(cfg: RunConfig, run_dir: Path, data: str, quiet: bool):
    """One process without Ray (train.workers = 0) or Ray Train + DeepSpeed workers."""
    if cfg.train.workers <= 0:
        from .trainer import train

        return train(cfg, run_dir, data=data, progress=not quiet)
    import json

    from .ray_train import train_distributed
    from .trainer import TrainResult

    finished = run_dir / "train_result.json"
    out = json.loads(finished.read_text()) if finished.is_file() else {}
    if out.get("steps", 0) >= cfg.train.steps and out.get("export_dir") and Path(out["export_dir"]).is_dir():
        print(f"train: {run_dir} already trained to step {out['steps']}, skipping (raise train.steps to continue)")
    else:
        out = train_distributed(cfg, run_dir, data, progress=not quiet)
    return TrainResult(run_dir=run_dir, steps=out["steps"], losses=out["losses"],
                       last_metrics=out["last_metrics"], export_dir=Path(out["export_dir"]) if out["export_dir"] else None)


def cmd_train(cfg: RunConfig, run_dir: Path, args) -> int:
    data = training_data(cfg, run_dir, args.data)
    _summary(run_training(cfg, run_dir, data, args.quiet))
    return 0


def _summary(result) -> None:
    m = result.last_metrics
    if m:
        fve = ", ".join(f"{k} {v:.3f}" for k, v in m["fve"].items())
        print(f"step {result.steps}: loss {m['loss']['total']:.4g}, FVE {fve}, L0 {m['l0']:.1f}, "
              f"dead {m['dead_fraction']:.1%}")
    if result.export_dir:
        print(f"crosscoder exported to {result.export_dir} (load with CrossCoder.from_pretrained)")


def run_analysis(cfg: RunConfig, run_dir: Path, data: str, quiet: bool) -> Path:
    """Write <run>/analysis/latents.csv, summary.json and report.html; return the report's path."""
    from . import analysis as an
    from .report import write_report

    model, root = an.load_for_run(run_dir, cfg.analyze.data or data, cfg.storage)
    result = an.analyze(model, root, cfg.analyze, progress=not quiet)
    result.ce_recovered = an.ce_recovered_for_harvest(model, root, cfg.analyze, announce=not quiet)
    out = run_dir / "analysis"
    an.save(result, out)
    report = write_report(result, out / "report.html", title=f"Crosscoder model-diffing report: {cfg.name}")
    counts = result.class_counts()
    arts = result.artifact_counts()
    print(f"analyze: {result.tokens} tokens; latents shared {counts['shared']}, base-only {counts['base_only']}, "
          f"chat-only {counts['chat_only']}, dead {counts['dead']}; Latent Scaling flags "
          f"{arts['chat_only']['flagged']} of {arts['chat_only']['latents']} chat-only latents")
    for name, ce in result.ce_recovered.items():
        print(f"analyze: CE loss recovered {name}: {ce['recovered']:.3f}")
    print(f"analysis: {(out / 'latents.csv').absolute()}\nreport: {report.absolute()}")
    return report


def cmd_analyze(cfg: RunConfig, run_dir: Path, args) -> int:
    run_analysis(cfg, run_dir, training_data(cfg, run_dir, args.data), args.quiet)
    return 0


def cmd_compare(args) -> int:
    """Chat-only / base-only latents and their Latent Scaling flags, side by side for several runs."""
    import json

    rows = []
    for run in args.runs:
        path = Path(run) / "analysis" / "summary.json"
        if not path.is_file():
            print(f"crosscoder: {path} is missing; run `crosscoder analyze --run {run}` first", file=sys.stderr)
            return 1
        s = json.loads(path.read_text())
        config = json.loads((Path(run) / "crosscoder" / "config.json").read_text())
        a = s["artifacts"]
        rows.append([run, config.get("activation", "?"), s["latents"], s["classes"]["dead"],
                     f"{min(s['fve'].values()):.3f}", a["chat_only"]["latents"], a["chat_only"]["complete_shrinkage"],
                     a["chat_only"]["latent_decoupling"], a["chat_only"]["latents"] - a["chat_only"]["flagged"],
                     a["base_only"]["latents"], a["base_only"]["flagged"]])
    header = ["run", "sparsity", "latents", "dead", "min FVE", "chat-only", "shrinkage", "decoupling",
              "chat-only kept", "base-only", "base-only flagged"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return 0


def cmd_run(cfg: RunConfig, run_dir: Path, args) -> int:
    from .shards import ShardError, read_manifest
    from .storage import open_root
    from .synthetic import write_synthetic

    if cfg.harvest.tiny_models and not cfg.harvest.models:
        _use_tiny_models(cfg, run_dir, args.quiet)
    data = training_data(cfg, run_dir, getattr(args, "data", None))
    if cfg.harvest.models:
        from .harvest import harvest

        cfg.harvest.output = cfg.harvest.output or data
        manifest = harvest(cfg, progress=not args.quiet)  # skips shards already committed
        print(f"harvest: {manifest.tokens} tokens in {len(manifest.shards)} shards at {cfg.harvest.output}")
        data = cfg.train.data or cfg.harvest.output
    root = open_root(data, cfg.storage)
    if not cfg.harvest.models:
        try:
            manifest = read_manifest(root)
            print(f"shards: {data} already complete ({len(manifest.shards)} shards), skipping generation")
        except ShardError as e:
            if "no manifest.json" not in str(e):
                raise
            print(f"shards: writing planted synthetic activations to {data}")
            write_synthetic(cfg.synthetic, data, progress=not args.quiet, root=root)
    result = run_training(cfg, run_dir, data, args.quiet)
    _summary(result)
    _planted_summary(root, result)
    report = run_dir / "analysis" / "report.html"
    export = run_dir / "crosscoder" / "model.safetensors"
    if report.is_file() and export.is_file() and report.stat().st_mtime >= export.stat().st_mtime:
        print(f"analyze: {report} is newer than the export, skipping (`crosscoder analyze` redoes it)\n"
              f"report: {report.absolute()}")
    else:
        run_analysis(cfg, run_dir, data, args.quiet)
    print(f"run directory: {run_dir.absolute()}")
    return 0


def _planted_summary(root, result) -> None:
    """On planted synthetic data, say how much of the planted truth the crosscoder recovered."""
    from .shards import read_manifest
    from .synthetic import PLANTED, read_planted, score_recovery

    if result.export_dir is None or not root.exists(PLANTED):
        return
    from .model import CrossCoder

    model = CrossCoder.from_pretrained(result.export_dir)
    raw_scale = read_manifest(root).extra.get("synthetic", {}).get("raw_scale", [1.0] * model.spec.n_sources)
    rec = score_recovery(model.W_dec.detach().numpy(), model.spec.widths, read_planted(root), raw_scale,
                         model.spec.norm_scale)
    print(f"planted truth: mean best decoder cosine {rec.mean_best_cosine:.3f}, "
          f"{(rec.best_cosine > 0.9).mean():.1%} of features recovered at cosine > 0.9, "
          f"shared/base-only/chat-only classification accuracy {rec.class_accuracy:.1%}")


COMMANDS = {
    "harvest": (cmd_harvest, "harvest activations from models into shards (Ray actors)"),
    "synthetic": (cmd_synthetic, "write planted-truth synthetic shards"),
    "tiny": (cmd_tiny, "make a tiny base/chat model pair and documents (no download), for trying the harvest"),
    "train": (cmd_train, "train a crosscoder on a shard root"),
    "analyze": (cmd_analyze, "model-diffing analysis of a trained run: latents.csv and report.html"),
    "run": (cmd_run, "every stage in order; with no arguments, the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosscoder",
        description="Train sparse crosscoders for model diffing and cross-layer features.",
        epilog="Any config key can be overridden: --train.k 64, --synthetic.tokens=100000. "
        "'crosscoder keys' lists them all.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="TOML config file (default for `run`: the embedded default)")
        p.add_argument("--run", help="run directory (default runs/<config name>)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("train", "run", "analyze"):
            p.add_argument("--data", help="shard root (path, file://… or s3://…), overriding the config")
        if name == "synthetic":
            p.add_argument("--output", help="shard root to write (default: synthetic.output or <run>/shards)")
        if name == "tiny":
            p.add_argument("--output", default="tiny-models", help="directory for base/, chat/ and documents.jsonl")
            p.add_argument("--hidden", type=int, default=64, help="hidden size of the models")
            p.add_argument("--layers", type=int, default=4, help="number of decoder layers")
            p.add_argument("--documents", type=int, default=2000, help="number of documents to write")
    sub.add_parser("keys", help="list every config key with its default and meaning")
    cmp = sub.add_parser("compare", help="chat-only latents and Latent Scaling flags of several analysed runs",
                         description="Print, for each run directory, its latent classes and how many exclusive "
                         "latents Latent Scaling flags (e.g. an L1 and a BatchTopK crosscoder on the same shards).")
    cmp.add_argument("runs", nargs="+", help="run directories with analysis/summary.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    # PyTorch's CPU allocator backs tensors of 2 MiB and more with transparent huge pages when this
    # is set: a training step allocates its gradients afresh (128 MiB each at L = 64k, D = 512), and
    # their first-touch page faults fall from ~45 ms to ~11 ms per tensor (measured on this
    # project's machine). Read at the process's first large allocation; the Ray processes this
    # command starts inherit it. Costs a little more resident memory; set it to 0 to turn it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        return cmd_compare(args)
    if args.command == "keys":
        for key, default, help_text in describe(RunConfig):
            print(f"{key:32s} {default:24s} {help_text}")
        return 0
    try:
        cfg, run_dir = resolve(args, rest)
        return COMMANDS[args.command][0](cfg, run_dir, args)
    except ConfigError as e:
        print(f"crosscoder: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosscoder: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line for expected failures
        from .documents import DataError
        from .models import ModelError
        from .shards import ShardError
        from .storage import StorageError
        from .analysis import AnalysisError
        from .trainer import RunDirError, TrainingDiverged

        if isinstance(e, (AnalysisError, ShardError, StorageError, RunDirError, TrainingDiverged, FileNotFoundError, DataError,
                          ModelError)):
            print(f"crosscoder: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
