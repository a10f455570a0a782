"""The ``crosscoder`` command line: the only place that parses arguments.

Subcommands share one shape: ``--config FILE.toml``, ``--run DIR`` (default ``runs/<config name>``)
and dotted overrides of any config key (``--train.k 64`` or ``--train.k=64``). ``crosscoder run``
with no arguments runs the embedded default configuration end to end. What each command does is
in pipeline.py; a failure the user can fix is one ``crosscoder: ...`` line, not a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from importlib import resources
from pathlib import Path

from .config import ConfigError, RunConfig, apply_overrides, describe, load_config, validate_loaded
from .errors import AnalysisError, CrosscoderError, NoRunDirectory
from .interrupts import stop_signals_as_ctrl_c


def _split_overrides(rest: list[str]) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        name = arg.split("=", 1)[0][2:]
        # a dotless flag only for a key outside any table (`--name`): others are stray arguments
        if not arg.startswith("--") and arg.endswith(".toml"):
            raise ConfigError(f"unexpected argument {arg!r}: a config file is given as --config {arg}")
        if not arg.startswith("--") or ("." not in name and name not in {key for key, _, _ in describe()}):
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


def _take_run_directory(rest: list[str]) -> tuple[str | None, list[str]]:
    """``train`` and ``analyze`` take the run directory as ``export`` does, as a word of its own
    (``crosscoder analyze runs/default``): the first argument that is neither an override nor its value."""
    i = 0
    while i < len(rest):
        if not rest[i].startswith("--"):
            return rest[i], rest[:i] + rest[i + 1:]
        i += 1 if "=" in rest[i] else 2
    return None, rest


def default_config_path() -> Path:
    return Path(str(resources.files("crosscoder") / "configs" / "default.toml"))


def config_path(args, overrides: list[tuple[str, str]]) -> str | Path | None:
    """The config file a command reads: ``--config``; else the run directory's own config.toml: for
    ``train``/``analyze`` that of ``--run DIR`` or of the default ``runs/<name>``, so ``crosscoder
    train --train.steps 800`` after ``crosscoder run`` continues that run, and for ``run`` that of
    ``--run DIR``; else the embedded default for ``run``; else None, the package's defaults."""
    path = args.config
    if path is None and args.command in ("train", "analyze", "run"):
        if args.run:
            own = Path(args.run) / "config.toml" if "{name}" not in args.run else None
        elif args.command != "run":  # the directory runs/<name> these overrides lead to
            own = Path("runs") / apply_overrides(RunConfig(), overrides).name / "config.toml"
        else:
            own = None
        if own is not None and own.is_file():
            path = own
    return path or (default_config_path() if args.command == "run" else None)


def resolve(args, rest) -> tuple[RunConfig, Path]:
    """The config (:func:`config_path`) with the overrides, and the run directory."""
    overrides = _split_overrides(rest)
    path = config_path(args, overrides)
    cfg = load_config(path)
    apply_overrides(cfg, overrides)
    validate_loaded(cfg, path, (key for key, _ in overrides))  # an error names the file its keys came from
    run_dir = Path(args.run.replace("{name}", cfg.name)) if args.run else Path("runs") / cfg.name
    return cfg, run_dir


def cmd_compare(runs: list[str]) -> int:
    """Exclusive latents and their Latent Scaling flags, side by side for several runs. The columns
    are named by the two sources each run compares (base/chat, or layers in a cross-layer run); a
    run whose analysis did not run Latent Scaling (the aligned variant, sources of unequal widths)
    shows n/a for its flags, not a count of 0 that would read as "every exclusive latent checked"."""
    from .analysis import class_names, export_config, read_summary, staleness

    rows, pairs, skipped, stale = [], [], [], []
    for run in runs:
        path = existing_run(Path(run)) / "analysis" / "summary.json"
        if not path.is_file():
            raise AnalysisError(f"{path} is missing; run `crosscoder analyze --run {run}` first")
        config = export_config(Path(run) / "crosscoder")
        s = read_summary(Path(run))  # an unreadable one: named, with the command that writes it again
        if why := staleness(Path(run)):
            stale.append(f"{run} ({why})")
        try:
            second, first = s["artifacts"]["chat_only"], s["artifacts"]["base_only"]
            pairs.append(tuple(s["sources"]))
            if not_scaled := s.get("latent_scaling_skipped"):
                skipped.append(f"{run} ({not_scaled})")
            flags = (["n/a", "n/a", "n/a", first["latents"], "n/a"] if not_scaled else
                     [second["complete_shrinkage"], second["latent_decoupling"], second["latents"] - second["flagged"],
                      first["latents"], first["flagged"]])
            rows.append([run, config.get("activation", "?"), s["latents"], s["classes"]["dead"],
                         f"{min(s['fve'].values()):.3f}", second["latents"], *flags])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AnalysisError(f"{path} is not an analysis summary this version reads ({type(e).__name__}: {e}); "
                                f"run `crosscoder analyze --run {run}` again") from None
    same = len(set(pairs)) == 1
    named = class_names(pairs[0]) if same else {"base_only": "1st-only", "chat_only": "2nd-only"}
    second_only, first_only = named["chat_only"], named["base_only"]
    header = ["run", "sparsity", "latents", "dead", "min FVE", second_only, "shrinkage", "decoupling",
              f"{second_only} kept", first_only, f"{first_only} flagged"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    if not same:
        print("the 1st and 2nd sources each run compares: " + "; ".join(
            f"{run} {pair[0]}/{pair[1]}" for run, pair in zip(runs, pairs)))
    if skipped:
        print("n/a: Latent Scaling did not run for " + "; ".join(skipped))
    if stale:
        print(f"older than the crosscoder it describes: the analysis of {', '.join(stale)}; "
              f"`crosscoder analyze RUN` redoes it")
    return 0


def cmd_keys() -> int:
    rows = describe(RunConfig)
    key_width = max(len(key) for key, _, _ in rows)
    default_width = max(len(default) for _, default, _ in rows)
    for key, default, help_text in rows:
        print(f"{key:{key_width}}  {default:{default_width}}  {help_text}")
    sys.stdout.flush()  # a closed pipe fails here, inside main's handler, not at the interpreter's exit
    return 0


def cmd_validate(args) -> int:
    """Check a dataset: manifest, shard sizes (one listing), and with --full every shard's sha256 and values."""
    from .config import StorageConfig
    from .shards import validate
    from .storage import open_root

    manifest = validate(open_root(args.root, StorageConfig(endpoint_url=args.endpoint_url or "")), full=args.full,
                        progress=not args.quiet)
    what = ("sizes and sha256 of every shard match the manifest, every activation is finite" if args.full
            else "sizes of every shard match the manifest (--full also checks their sha256 and values)")
    print(f"{args.root}: {len(manifest.shards)} shards, {manifest.tokens} tokens; {what}")
    return 0


def cmd_tiny(args) -> int:
    from . import random_pair
    from .device import settle_deepspeed_accelerator

    if args.hidden < 4 or args.hidden % 4 or args.layers < 1 or args.documents < 1:
        raise ConfigError(f"--hidden must be a positive multiple of 4 (the models' attention heads), --layers and "
                          f"--documents positive; got {args.hidden}, {args.layers}, {args.documents}")
    output = Path(args.output)
    settle_deepspeed_accelerator()  # saving the models imports DeepSpeed (through accelerate)
    base, chat = random_pair.make_pair(output, hidden=args.hidden, layers=args.layers)
    docs = random_pair.write_documents(output / "documents.jsonl", n_docs=args.documents)
    print(f"tiny base model: {base}\ntiny chat model: {chat}\ndocuments: {docs}")
    models = f"[{{name = \"base\", path = {json.dumps(base)}}}, {{name = \"chat\", path = {json.dumps(chat)}}}]"
    print("next, harvest them and train a crosscoder (the embedded default's settings, at a middle block): "
          + shlex.join(["crosscoder", "run", "--run", "runs/tiny", "--harvest.models", models, "--harvest.data", docs,
                        "--harvest.hooks", f"model.layers.{max(args.layers // 2 - 1, 0)}"]))
    return 0


def run_command(args, rest, argv: list[str] | None = None) -> int:
    from . import pipeline
    from .run_lock import hold

    cfg, run_dir = resolve(args, rest)
    progress, data = not args.quiet, getattr(args, "data", None)
    command = " ".join(["crosscoder", *(argv if argv is not None else sys.argv[1:])])
    if args.command == "run":
        pipeline.run(cfg, run_dir, data, progress=progress, command=command)
        return 0
    plan = pipeline.plan(cfg, run_dir, data)  # a config error stops here, in one line
    if args.command == "analyze":
        existing_run(plan.run_dir)  # before the lock, which would make it
    if args.command == "train" and config_path(args, _split_overrides(rest)) is None:
        if cfg.train.workers == 0:  # the one config error training finds later: before the note, one line still
            from .device import resolve as resolve_device

            resolve_device(cfg.train.device, quiet=True)
        # not the demo's embedded default either: say so, as the other `train:` lines are said
        print(f"train: no --config and no {run_dir / 'config.toml'}: the package's defaults (`crosscoder keys` "
              "lists them)")
    with hold(plan.run_dir, command):
        if args.command == "harvest":
            pipeline.harvest(plan, progress)
        elif args.command == "synthetic":
            pipeline.synthetic(plan, progress, output=args.output, keep_complete=False)
        elif args.command == "train":
            pipeline.print_training_summary(pipeline.train(plan, progress), plan.cfg.train.dead_tokens)
        elif args.command == "analyze":
            pipeline.analyze(plan, progress)
    return 0


CONFIG_DEFAULTS = {  # config_path
    "run": " (default: the --run directory's own config.toml when it has one, else the embedded default)",
    "train": " (default: the run directory's own config.toml when it has one, else the package's defaults)",
    "analyze": " (default: the run directory's own config.toml)",
}

COMMANDS = {
    "harvest": "harvest activations from models into shards (Ray actors)",
    "synthetic": "write planted-truth synthetic shards",
    "tiny": "make a tiny base/chat model pair and documents (no download), for trying the harvest",
    "train": "train a crosscoder on a shard root",
    "analyze": "model-diffing analysis of a trained run: latents.csv and report.html",
    "run": "every stage in order; with no arguments, the embedded default",
}
CONFIGURED = set(COMMANDS) - {"tiny"}  # the commands that read a config, so take --section.key overrides
OVERRIDES = ("Any config key can be overridden: --train.k 64, --synthetic.tokens=100000, "
             "--synthetic.widths '[64, 96]' (a list of one: --harvest.hooks model.layers.13). "
             "'crosscoder keys' lists them all.")


def _add_run_directory(parser: argparse.ArgumentParser, what: str) -> None:
    """The run directory of ``export`` and ``push``: positional, or ``--run`` as the other commands take it."""
    parser.add_argument("run", nargs="?", help=f"run directory ({what}); or --run DIR")
    parser.add_argument("--run", dest="run_option", metavar="DIR", help="the run directory, as `train --run` takes it")


def _one_run_directory(word: str | None, option: str | None) -> str | None:
    """The run directory given as a word of its own or as ``--run`` (both: the same one)."""
    if word and option and Path(word) != Path(option):
        raise ConfigError(f"two run directories given: {word} and --run {option}")
    return word or option


def _run_directory(args) -> Path:
    run = _one_run_directory(args.run, args.run_option)
    if not run:
        raise ConfigError(f"crosscoder {args.command} needs the run directory: crosscoder {args.command} RUN_DIR ... "
                          "(or --run RUN_DIR)")
    return existing_run(Path(run))


def existing_run(run_dir: Path) -> Path:
    """``run_dir``, which a command that only reads a run needs to exist."""
    if not run_dir.is_dir():
        raise NoRunDirectory(run_dir)
    return run_dir


def version_line() -> str:
    """``crosscoder 0.1.0 (Python 3.11.2, torch 2.13.0+cpu, ...)``: read from the installed packages'
    metadata, so ``--version`` imports none of them."""
    from importlib import metadata

    from . import __version__

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{p} {installed(p)}" for p in ("torch", "ray", "deepspeed", "transformers"))
    return f"crosscoder {__version__} (Python {sys.version.split()[0]}, {libraries})"


class _PrintVersion(argparse.Action):
    """``--version`` as one line (argparse's own version action wraps it at the terminal's width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosscoder",
        description="Train sparse crosscoders for model diffing and cross-layer features.",
        epilog=OVERRIDES,
    )
    parser.add_argument("--version", nargs=0, action=_PrintVersion,
                        help="this version and those of the libraries it runs on (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=OVERRIDES if name in CONFIGURED else None)
        if name in CONFIGURED:
            p.add_argument("--config", help="TOML config file" + CONFIG_DEFAULTS.get(name, ""))
            own = f"; or as a word of its own: crosscoder {name} RUN_DIR" if name in ("train", "analyze") else ""
            p.add_argument("--run", help="run directory (default runs/<config name>; {name} in it is the config "
                           f"name){own}")
        p.add_argument("--quiet", action="store_true",
                       help="no progress bars (nor Ray Train's lines on starting its workers)")
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
    exp = sub.add_parser("export", help="write a run's crosscoder in another tool's format",
                         description="Write <run>/crosscoder in another tool's format: dictionary_learning = a state "
                         "dict that science-of-finetuning/dictionary_learning's BatchTopKCrossCoder.from_pretrained "
                         "loads (acausal BatchTopK, sources of one width); neuronpedia = per-latent dashboards "
                         "(Neuronpedia's batch JSON, as SAEDashboard writes it) from the run's analysis.")
    _add_run_directory(exp, "its crosscoder/ export is read")
    exp.add_argument("--format", choices=["dictionary_learning", "neuronpedia"], default="dictionary_learning")
    exp.add_argument("--out", help="output file or directory (default <run>/exports/dictionary_learning.pt or "
                     "<run>/exports/neuronpedia/)")
    exp.add_argument("--data", help="neuronpedia: the analysed shard root (default: the run's analyze.data or "
                     "train.data)")
    exp.add_argument("--model-id", help="neuronpedia: the batch's model_id (default: the first source's model, "
                     "its repo name in lower case, as Neuronpedia names models)")
    exp.add_argument("--layer", type=int, help="neuronpedia: the batch's layer (default: the number in the first "
                     "source's hook)")
    exp.add_argument("--sae-set", default="", help="neuronpedia: the batch's sae_set (default: the run's name)")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    push = sub.add_parser("push", help="upload a run's crosscoder with a model card to the Hugging Face Hub",
                          description="Upload <run>/crosscoder (config.json, model.safetensors) and a generated "
                          "README.md model card to a Hub model repo, created if needed. Uses huggingface_hub: "
                          "HF_TOKEN or `hf auth login`, HF_ENDPOINT. CrossCoder.from_pretrained(REPO) loads it.")
    _add_run_directory(push, "its crosscoder/ export is uploaded")
    push.add_argument("repo", help="Hub repo id, owner/name")
    push.add_argument("--revision", help="branch to commit to (created if needed; default main)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--save-to", help="write what would be uploaded into this directory instead, and upload nothing")
    val = sub.add_parser("validate", help="check a shard dataset against its manifest",
                         description="Check a shard root: its manifest and every shard's size, from one listing; "
                         "with --full, every shard's sha256 and samples too (reads them all).")
    val.add_argument("root", help="shard root: a path, file://… or s3://bucket/prefix")
    val.add_argument("--full", action="store_true", help="also read every shard and check its sha256 and values")
    val.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto, …); default AWS_ENDPOINT_URL or AWS")
    val.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def cmd_export(args) -> int:
    if args.format == "neuronpedia":
        return cmd_export_dashboards(args)
    from .interop import export_dictionary_learning

    run = _run_directory(args)
    out = Path(args.out or run / "exports" / "dictionary_learning.pt")
    fit = export_dictionary_learning(run / "crosscoder", out)
    print(f"export: {out.absolute()} (dictionary_learning BatchTopKCrossCoder; scalar threshold {fit.threshold:.6g}, "
          f"per-latent thresholds within {fit.relative_spread:.2%} of it at the median, {fit.max_relative_error:.2%} "
          "at most)")
    return 0


def cmd_export_dashboards(args) -> int:
    from .analysis import export_config
    from .dashboard import export_dashboards
    from .interop import ExportError
    from .relocation import locator
    from .storage import open_root

    run = _run_directory(args)
    exported = run / "crosscoder" / "config.json"
    if not exported.is_file():
        raise ExportError(f"{exported.parent}: no crosscoder export; train the run first")
    cfg = load_config(run / "config.toml") if (run / "config.toml").is_file() else RunConfig()
    recorded = cfg.analyze.data or cfg.train.data or export_config(exported.parent).get("data") or ""
    data = args.data or locator(run)(recorded)  # a run directory moved since: its shards where they are now
    if not data:
        raise ConfigError(f"{run}: no shard root recorded; pass --data ROOT (the analysed shards)")
    out = Path(args.out or run / "exports" / "neuronpedia")
    done = export_dashboards(run, open_root(data, cfg.storage), out, context=cfg.analyze.context, sae_set=args.sae_set,
                             model_id=args.model_id, layer=args.layer, progress=not args.quiet)
    print(f"export: {done['features']} latent dashboards ({done['examples']} examples) in {done['batches']} "
          f"Neuronpedia batch files and crosscoder.json (decoder norms per source) in {out.absolute()}; model_id "
          f"{done['model_id']!r}, layer {done['layer']}, sae_set {done['sae_set']!r} (--model-id, --layer, --sae-set)")
    return 0


def cmd_push(args) -> int:
    from .analysis import staleness
    from .hub import push, stage

    export_dir = _run_directory(args) / "crosscoder"
    if why := staleness(export_dir.parent):
        print(f"push: {export_dir.parent}'s analysis predates its crosscoder ({why}): the card gives "
              f"the last training batch's figures; `crosscoder analyze {export_dir.parent}` first for the analysis's")
    if args.save_to:
        folder = stage(export_dir, args.save_to, args.repo)
        print(f"push: wrote {', '.join(sorted(p.name for p in folder.iterdir()))} to {folder.absolute()}; nothing "
              "uploaded")
        return 0
    url = push(export_dir, args.repo, revision=args.revision, private=args.private)
    print(f"push: {args.repo} {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # PyTorch's CPU allocator backs tensors of 2 MiB and more with transparent huge pages when this
    # is set: a training step allocates its gradients afresh (128 MiB each at L = 64k, D = 512), and
    # their first-touch page faults fall from ~45 ms to ~11 ms per tensor (measured on this
    # project's machine). Read at the process's first large allocation; the Ray processes this
    # command starts inherit it. Costs a little more resident memory; set it to 0 to turn it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    stop_signals_as_ctrl_c()  # docker stop, a deleted pod, Slurm's time limit: stop as after a Ctrl-C (interrupts.py)
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `crosscoder`: the commands, not argparse's complaint
        parser.print_help(sys.stderr)
        return 2
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in CONFIGURED:  # only these take config overrides; others never ignore one
        print(f"crosscoder {args.command}: unrecognized arguments: {' '.join(rest)} "
              f"(`crosscoder {args.command} --help` lists its options)", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):  # nor transformers' and huggingface_hub's bars (loading weights, downloads)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        if args.command in ("train", "analyze"):
            word, rest = _take_run_directory(rest)
            args.run = _one_run_directory(word, args.run)
        if args.command == "compare":
            return cmd_compare(args.runs)
        if args.command == "keys":
            return cmd_keys()
        if args.command == "tiny":
            return cmd_tiny(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "push":
            return cmd_push(args)
        return run_command(args, rest, argv)
    except ConfigError as e:
        print(f"crosscoder: config error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `crosscoder keys | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        again = {"harvest": "resume from the shards already committed", "train": "resume from the last checkpoint",
                 "run": "resume (committed shards and the last checkpoint are kept)"}
        print(f"crosscoder: interrupted; re-run the same command to {again.get(args.command, 'start it again')}",
              file=sys.stderr)
        return 130
    except (CrosscoderError, FileNotFoundError) as e:  # errors.py: a failure the user can fix, one line
        print(f"crosscoder: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename or "a file"
        print(f"crosscoder: cannot write {where}: {e.strerror}; free space (or raise the quota) and re-run the same "
              "command: committed shards and the last checkpoint are kept", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
