"""The stages of a run, chained: data (a harvest or planted synthetic shards), training, analysis.

``crosscoder run`` is :func:`run`, and each of ``crosscoder harvest | synthetic | train | analyze``
is one stage below; a Python user calls the same functions (``crosscoder.pipeline.run(cfg)``).
Every stage is skipped when its output is there and up to date, so re-running a command resumes:
committed shards are kept, a finished training (same dictionary, export present) and an analysis
of the export as it is (its steps and weights, recorded in ``summary.json``) are not redone, and a
finished, analysed run whose shards were since removed does not make them again.

Paths are resolved once, by :func:`plan`: a copy of the config with the demo pair's models filled
in, default outputs under the run directory and local paths made absolute (Ray actors and workers
run in other working directories), so no stage rewrites the config object. The cost: a stage
called on its own takes a :class:`Plan`, not a bare config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, validate
from .relocation import locator
from .storage import absolute_url


@dataclass
class Plan:
    cfg: RunConfig  # resolved: absolute local paths, demo-pair models, default outputs
    run_dir: Path
    data: str  # the shard root training reads (and analysis, unless analyze.data says otherwise)
    uses_demo_pair: bool = False  # the harvest's models are the demo pair, made in <run>/tiny
    organism: Path | None = None  # the harvest's models are the organism (organism.py), made there
    given_data: bool = False  # train.data or --data names the shards and synthetic.output does not: kept as found



def plan(cfg: RunConfig, run_dir: str | Path | None = None, data: str | None = None) -> Plan:
    """Check ``cfg`` and resolve where everything goes; ``data`` overrides the training shard root."""
    validate(cfg)
    from .device import settle_deepspeed_accelerator

    settle_deepspeed_accelerator()
    cfg = copy.deepcopy(cfg)
    run_dir = Path(run_dir) if run_dir else Path("runs") / cfg.name
    hc, tc = cfg.harvest, cfg.train
    locate = locator(run_dir)  # a run directory moved since it was trained: its own files are in it now
    tc.data, hc.output, hc.data = locate(tc.data), locate(hc.output), locate(hc.data)
    cfg.synthetic.output, cfg.analyze.data = locate(cfg.synthetic.output), locate(cfg.analyze.data)
    hc.models = [m | {"path": locate(m["path"])} if "path" in m else m for m in hc.models]
    given_data = bool(data or tc.data) and not cfg.synthetic.output
    uses_demo_pair = hc.demo_pair and not hc.models
    organism = Path(cfg.organism.directory).expanduser().absolute() if cfg.organism.directory and not hc.models \
        else None
    if organism is not None:
        hc.models = [{"name": name, "path": str(organism / name)} for name in ("base", "chat")]
        hc.data = hc.data or str(organism / "documents.jsonl")
    if uses_demo_pair:
        hc.models = [{"name": name, "path": str(run_dir / "tiny" / name)} for name in ("base", "chat")]
        hc.data = hc.data or str(run_dir / "tiny" / "documents.jsonl")
    shards = absolute_url(data or tc.data or hc.output or cfg.synthetic.output or str(run_dir / "shards"))
    if hc.models:
        hc.output = absolute_url(hc.output or shards)
        shards = absolute_url(data or tc.data or hc.output)
        if hc.data and not hc.data.startswith("hf:"):
            hc.data = str(Path(hc.data).expanduser().absolute())
        for m in hc.models:
            if uses_demo_pair or organism or Path(m["path"]).expanduser().exists():  # else a hub id
                m["path"] = str(Path(m["path"]).expanduser().absolute())
    else:
        cfg.synthetic.output = shards
    tc.data = shards
    return Plan(cfg, run_dir, shards, uses_demo_pair, organism, given_data)


# ---------------------------------------------------------------------------------------------
# stages


def make_demo_pair(p: Plan, progress: bool = True) -> None:
    """The demo base/chat pair and its documents in <run>/tiny, made once."""
    from . import demo_pair

    where, steps = p.run_dir / "tiny", p.cfg.harvest.demo_steps
    if not demo_pair.is_made(where, steps=steps):
        print(f"tiny models: training a demo base model and its chat fine-tune in {where.absolute()} "
              f"({steps} + {steps} steps)")
        demo_pair.make_demo_pair(where, steps=steps, progress=progress)
    if not (where / "documents.jsonl").is_file():
        print(f"tiny models: writing demo documents to {(where / 'documents.jsonl').absolute()}")
        demo_pair.write_demo_documents(where / "documents.jsonl", n_docs=4000)


def make_organism(p: Plan, progress: bool = True) -> None:
    """The organism pair and its documents in ``organism.directory``, made once."""
    from .organism import make_organism as make

    oc = p.cfg.organism
    assert p.organism is not None
    record = make(p.organism, gguf=oc.gguf, steps=oc.steps, lr=oc.lr, batch=oc.batch_size, documents=oc.documents,
                  progress=progress)
    b = record["behaviour"]
    print(f"organism: {p.organism} (fine-tune refuses {b['refused']}/{b['held_out_food_questions']} held-out food "
          f"questions, {b['refused_other']}/{b['held_out_other_questions']} others)")


def harvest(p: Plan, progress: bool = True):
    """Harvest the planned models into shards (committed shards are kept); returns the manifest."""
    from .harvest import harvest as run_harvest
    from .harvest import refuse_another_harvest

    if p.uses_demo_pair or p.organism is not None:
        refuse_another_harvest(p.cfg)  # an output root of another harvest: before the models are made
    if p.uses_demo_pair:
        make_demo_pair(p, progress)
    if p.organism is not None:
        make_organism(p, progress)
    manifest = run_harvest(p.cfg, progress=progress)
    print(f"harvest: {manifest.tokens} tokens in {len(manifest.shards)} shards at {p.cfg.harvest.output}")
    return manifest


def synthetic(p: Plan, progress: bool = True, output: str | None = None, keep_complete: bool = True):
    """Planted synthetic shards at ``output`` (default: the training root); with ``keep_complete``,
    a root that already holds this config's complete dataset is left as it is, and a dataset the
    config names as its training data (``train.data`` or ``--data``, as an L1 run names the shards
    of the BatchTopK run it is compared with) is trained on whatever it holds. The root is held
    while written (run_lock.shared_root): a sweep started at once writes it once."""
    from .run_lock import shared_root
    from .shards import ManifestMissing, ShardError, check_sizes, read_manifest
    from .storage import open_root
    from .synthetic import check_same_synthetic, write_synthetic

    given = p.given_data and output is None
    output = absolute_url(output or p.cfg.synthetic.output or p.data)
    root = open_root(output, p.cfg.storage)

    def complete():
        try:
            manifest = read_manifest(root)
        except ManifestMissing:
            return None
        try:
            check_same_synthetic(output, manifest, p.cfg.synthetic)
        except ShardError:
            if not given:
                raise
            check_sizes(root, manifest)  # not this config's data: nothing to write again, a gap is an error
            held = "synthetic data of another config" if "synthetic" in manifest.extra else "harvested activations"
            print(f"shards: {output} holds {held} ({len(manifest.shards)} shards), named as the training data; "
                  "training on them as they are")
            return manifest
        try:
            check_sizes(root, manifest)
        except ShardError as missing:  # every shard is a function of (config, n): writing it again mends it
            print(f"shards: {missing}; writing the synthetic data again")
            return None
        print(f"shards: {output} already complete ({len(manifest.shards)} shards), skipping generation")
        return manifest

    if keep_complete and (manifest := complete()):  # a complete root may be read-only: no lock taken
        return manifest
    root.check_writable()
    with shared_root(root, "shards"):
        if keep_complete and (manifest := complete()):  # written by the run this one waited for
            return manifest
        print(f"shards: writing planted synthetic activations to {output}")
        manifest = write_synthetic(p.cfg.synthetic, output, progress=progress, root=root)
    print(f"wrote {len(manifest.shards)} shards, {manifest.tokens} tokens, to {output}")
    return manifest


def train(p: Plan, progress: bool = True):
    """Train in this process (``train.workers = 0``) or on Ray Train + DeepSpeed workers; a run
    already trained to ``train.steps`` with this dictionary is not trained again."""
    from .errors import CrosscoderError
    from .shards import ManifestMissing, read_manifest
    from .storage import open_root
    from .trainer import TrainResult, spec_from, with_saved_scale
    from .trainer import train as train_here

    tc = p.cfg.train
    try:
        finished = TrainResult.read(p.run_dir)
    except CrosscoderError:
        # the last call stopped (a NaN, a bad shard, the data's end, a full disk): train again, from
        # its last checkpoint, once the cause is mended (a lower learning rate, the shard, more epochs)
        finished = None
    try:
        manifest = read_manifest(open_root(p.data, p.cfg.storage))
    except ManifestMissing:
        done = finished_without_data(p)
        if done is None:
            raise
        print(f"train: {p.run_dir.absolute()} already trained to step {done.steps}; its shards ({p.data}) are gone, "
              "which a finished run does not need, skipping")
        return done
    spec, _ = with_saved_scale(spec_from(tc, manifest), finished.spec if finished is not None else None)
    if finished is not None and finished.is_finished(tc, spec):
        print(f"train: {p.run_dir.absolute()} already trained to step {finished.steps}, skipping (raise train.steps "
              "to continue)")
        return finished
    if tc.workers <= 0:
        return train_here(p.cfg, p.run_dir, data=p.data, progress=progress)
    from .ray_train import train_distributed

    return train_distributed(p.cfg, p.run_dir, p.data, progress=progress)


DICTIONARY_KEYS = ("latents", "arch", "activation", "k")  # the spec's fields a config sets (the rest: the data's)


def refuse_another_dictionary(p: Plan) -> None:
    """A run directory whose newest checkpoint was trained with another ``train.latents``, ``arch``,
    ``activation`` or ``k`` is refused before the data stage, not after a harvest of minutes or
    hours. The sources and widths come from the data, so they are compared once it is there: by the
    Ray Train driver before its workers start, and by the trainer when it loads the checkpoint."""
    from .checkpoint_handoff import saved_spec
    from .trainer import another_dictionary, newest_checkpoint

    saved = newest_checkpoint(p.run_dir)
    then = saved_spec(saved) if saved is not None else None
    if then is None:
        return
    new = {key: getattr(p.cfg.train, key) for key in DICTIONARY_KEYS}
    if (refusal := another_dictionary(p.run_dir, then, new)) is not None:
        raise refusal


def finished_without_data(p: Plan):
    """The result of a run trained to ``train.steps`` whose shards were since removed (they are
    large, and a finished run needs them no more), or None. Only when nothing that made the data
    or sets the dictionary changed since (``<run>/config.toml``, written by the training): then
    making the data again would give what was trained on, and training would be skipped."""
    from .config import ConfigError, load_config
    from .errors import CrosscoderError
    from .trainer import TrainResult

    saved, tc = p.run_dir / "config.toml", p.cfg.train
    try:
        finished = TrainResult.read(p.run_dir)
        then = load_config(saved) if saved.is_file() else None
    except (CrosscoderError, ConfigError):  # a recorded stop: not finished
        return None
    if finished is None or then is None or finished.export_dir is None:
        return None
    same_data = (then.harvest, then.synthetic, then.organism, then.train.data) == (
        p.cfg.harvest, p.cfg.synthetic, p.cfg.organism, tc.data)
    same_dictionary = all(finished.spec.get(key) == getattr(tc, key) for key in DICTIONARY_KEYS)
    trained = finished.steps >= tc.steps and (finished.export_dir / "model.safetensors").is_file()
    return finished if same_data and same_dictionary and trained else None


def _has_manifest(p: Plan) -> bool:
    """False only when the shard root has no manifest (an unreachable store counts as True: the
    data stage names the cause)."""
    from .errors import CrosscoderError
    from .shards import ManifestMissing, read_manifest
    from .storage import open_root

    try:
        read_manifest(open_root(p.data, p.cfg.storage))
    except ManifestMissing:
        return False
    except (CrosscoderError, OSError):
        pass
    return True


def _analysed(p: Plan) -> bool:
    """The analysis (and the organism's, for an organism run) describes the export as it is now."""
    from .analysis import is_analysed

    return is_analysed(p.run_dir) and (p.organism is None or (p.run_dir / "analysis" / "organism.json").is_file())


def analyze(p: Plan, progress: bool = True, only_if_stale: bool = False) -> dict | None:
    """``analysis/latents.csv``, ``summary.json`` and ``report.html``; with ``only_if_stale``, nothing
    when the analysis describes the export as it is (``analysis.is_analysed``). Returns the summary
    (None when skipped).

    Where it runs (``analyze.device``): on this process's GPU when it has one; else, on a Ray cluster
    with GPUs (the driver of a job usually runs on a CPU head node), as a Ray task on one GPU, which
    loads the crosscoder and, for CE loss recovered, each model once; else here on the CPU.
    """
    from .analysis import class_names, export_of, is_analysed, trained_steps_of

    out = p.run_dir / "analysis"
    report = out / "report.html"
    if only_if_stale and is_analysed(p.run_dir):
        steps = trained_steps_of(p.run_dir / "crosscoder")
        print(f"analyze: {report.absolute()} describes the export{f' (step {steps})' if steps else ''}, skipping "
              f"(`crosscoder analyze` redoes it)\nreport: {report.absolute()}")
        return None

    export = export_of(p.run_dir)  # a run not trained yet: said before the device is chosen or a Ray task started
    setting = p.cfg.analyze.device
    if setting != "cpu" and not _local_cuda() and _cluster_gpus() > 0:
        from .ray_connect import connect
        from .shared_paths import check_nodes_see

        print("analyze: on a GPU of the Ray cluster")
        ray = connect()
        check_nodes_see(ray, "GPU", "the analysis",
                        files={f"the run directory {p.run_dir}": export / "model.safetensors"})
        summary = ray.get(ray.remote(num_gpus=1)(analyze_here).remote(p, False, "auto"))
    else:
        summary = analyze_here(p, progress, setting)
    from .ce_recovered import describe

    counts, arts, named = summary["classes"], summary["artifacts"], class_names(summary["sources"])
    skipped = summary.get("latent_scaling_skipped", "")
    scaling = (f"Latent Scaling not run ({skipped})" if skipped else f"Latent Scaling flags "
               f"{arts['chat_only']['flagged']} of {arts['chat_only']['latents']} {named['chat_only']} latents")
    print(f"analyze: {summary['tokens']} tokens; latents shared {counts['shared']}, {named['base_only']} "
          f"{counts['base_only']}, {named['chat_only']} {counts['chat_only']}, dead {counts['dead']}; {scaling}; "
          f"inference L0 {summary['inference_l0']:.1f}")
    for name, ce in summary["ce_loss_recovered"].items():
        print(f"analyze: CE loss recovered {name}: {describe(ce)}")
    print(f"analysis: {(out / 'latents.csv').absolute()}\nreport: {report.absolute()}")
    return summary


def analyze_here(p: Plan, progress: bool, setting: str) -> dict:
    """The analysis in this process, on the device ``setting`` resolves to; returns the summary."""
    from . import analysis as an
    from .device import resolve
    from .report import dictionary_line, write_report

    cfg, out = p.cfg, p.run_dir / "analysis"
    device = resolve(setting, "analyze.device", quiet=not progress)
    model, root = an.load_for_run(p.run_dir, cfg.analyze.data or p.data, cfg.storage, device)
    result = an.analyze(model, root, cfg.analyze, progress=progress)
    result.ce_recovered = an.ce_recovered_for_harvest(model, root, cfg.analyze, announce=progress)
    result.trained_steps = an.trained_steps_of(p.run_dir / "crosscoder")
    result.export_fingerprint = an.export_fingerprint(p.run_dir / "crosscoder")
    # the run directory's name too where it is not the config's (two variants of one config, side by side)
    name = cfg.name if p.run_dir.name == cfg.name else f"{cfg.name} ({p.run_dir.name})"
    spec = model.spec
    write_report(result, out / "report.html", title=f"Crosscoder model-diffing report: {name}",
                 crosscoder=dictionary_line(spec.arch, spec.activation, spec.k))
    an.save(result, out)  # summary.json last: what is_analysed reads to skip the analysis on a re-run
    return result.summary()


def organism_report(p: Plan, progress: bool = True) -> dict:
    """Where the latents of each class fire: on conversations about food (the fine-tune's behaviour)
    vs the base rate; ``analysis/organism.json``."""
    from . import analysis as an
    from .organism import behaviour_shares

    assert p.organism is not None
    model, root = an.load_for_run(p.run_dir, p.cfg.analyze.data or p.data, p.cfg.storage)
    result = behaviour_shares(model, root, p.organism, p.run_dir / "analysis", progress=progress)
    print(f"organism: {result['food_token_share']:.1%} of the tokens are in food conversations; share of firings "
          "there, per class: " + ", ".join(
              f"{c} {v['latents']} latents" + (f" (median {v['median_food_share']:.1%}, {v['food_selective']} "
                                              f"food-selective, {v['refusal_selective']} refusal-selective)"
                                              if v["latents"] else "")
              for c, v in result["classes"].items()))
    print(f"organism: {p.run_dir / 'analysis' / 'organism.json'}")
    return result


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cluster_gpus() -> float:
    """GPUs of the Ray cluster this process uses (0 without one: no Ray is started for this)."""
    import os

    import ray

    if not (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
        return 0
    from .ray_connect import connect

    return connect().cluster_resources().get("GPU", 0)


def run(cfg: RunConfig, run_dir: str | Path | None = None, data: str | None = None, progress: bool = True,
        command: str = "crosscoder.pipeline.run"):
    """Every stage in order: the data (harvest when ``harvest.models`` or the demo pair is set, else
    planted synthetic shards), training, the planted-truth score (synthetic data), the analysis.
    The run directory is held for the whole run (run_lock.py): a second one there is refused."""
    from .run_lock import hold

    p = plan(cfg, run_dir, data)
    with hold(p.run_dir, command):
        return _run(p, progress)


def _run(p: Plan, progress: bool):
    done = finished_without_data(p) if _analysed(p) and not _has_manifest(p) else None
    if done is not None:  # its shards were removed after the run: not made again
        print(f"run: {p.run_dir.absolute()} is trained (step {done.steps}) and analysed; its shards ({p.data}) were "
              "removed and are not made again (`crosscoder analyze` would need them)")
        print_training_summary(done, p.cfg.train.dead_tokens)
        print(f"report: {(p.run_dir / 'analysis' / 'report.html').absolute()}\nrun directory: {p.run_dir.absolute()}")
        return done
    refuse_another_dictionary(p)
    if p.cfg.harvest.models:
        harvest(p, progress)
    else:
        synthetic(p, progress)
    result = train(p, progress)
    print_training_summary(result, p.cfg.train.dead_tokens)
    print_planted_recovery(p, result)
    analyze(p, progress, only_if_stale=True)
    if p.organism is not None:
        organism_report(p, progress)
    print(f"run directory: {p.run_dir.absolute()}")
    return result


def print_training_summary(result, dead_tokens: int) -> None:
    from .dead import dead_share

    m = result.last_metrics
    if m:
        fve = ", ".join(f"{k} {v:.3f}" for k, v in m["fve"].items())
        dead = dead_share(m, dead_tokens) or f"n/a (counted from {dead_tokens:,} tokens, train.dead_tokens)"
        print(f"step {result.steps}: loss {m['loss']['total']:.4g}, FVE {fve}, L0 {m['l0']:.1f}, dead {dead}")
    if result.export_dir:
        print(f"crosscoder exported to {Path(result.export_dir).absolute()} (load with CrossCoder.from_pretrained)")


def print_planted_recovery(p: Plan, result) -> None:
    """On planted synthetic data, how much of the planted truth the crosscoder recovered."""
    from .model import CrossCoder
    from .shards import read_manifest
    from .storage import open_root
    from .synthetic import PLANTED, read_planted, score_recovery

    root = open_root(p.data, p.cfg.storage)
    if result.export_dir is None or not root.exists(PLANTED):
        return
    model = CrossCoder.from_pretrained(result.export_dir)
    raw_scale = read_manifest(root).extra.get("synthetic", {}).get("raw_scale", [1.0] * model.spec.n_sources)
    rec = score_recovery(model.W_dec.detach().numpy(), model.spec.widths, read_planted(root), raw_scale,
                         model.spec.norm_scale)
    print(f"planted truth: mean best decoder cosine {rec.mean_best_cosine:.3f}, "
          f"{(rec.best_cosine > 0.9).mean():.1%} of features recovered at cosine > 0.9, "
          f"shared/base-only/chat-only classification accuracy {rec.class_accuracy:.1%}")
