"""The Hugging Face Hub: push a run's crosscoder with a model card, pull one by repo id.

Why this shape: a Hub repo holds exactly the export (``config.json``, ``model.safetensors``, the
files :meth:`CrossCoder.from_pretrained` reads from a directory) plus a ``README.md`` model card, so
a pulled repo is a directory like ``<run>/crosscoder`` and one loader serves both. Everything that
talks to the Hub is ``huggingface_hub``'s own: ``create_repo`` + ``upload_folder`` to push,
``snapshot_download`` to pull (its cache, revisions, ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` behave as they do for any Hub model), ``ModelCard``/``ModelCardData`` for the
card's metadata. The card is generated from what the run recorded: the export's config (sources,
widths, latents, k, tokens trained, the data's fingerprint), the data manifest's sources (models
and hooks), the last training metrics (the dead fraction, "not counted" when the run trained on
fewer tokens than its dead-latent window) and, when the run was analysed, the analysis summary
(FVE on the analysed tokens, inference L0 with the calibrated thresholds).

The cost: a push uploads the whole ``model.safetensors`` every time (the Hub deduplicates unchanged
content); a pull downloads it into the Hub cache (``HF_HOME``), not into a run directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import load_config
from .dead import dead_share
from .errors import CrosscoderError, message_line

# the files a pushed repo holds; a pull fetches only these
REPO_FILES = ["config.json", "model.safetensors", "README.md"]
LIBRARY = "crosscoder"


class HubError(CrosscoderError, RuntimeError):
    """Talking to the Hub failed; the message names the repo and says why."""


def is_repo_id(name: str | Path) -> bool:
    """``owner/name`` (or ``name``) that is not an existing local path."""
    text = str(name)
    if Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in text.split("/"))


def download(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
             token: str | bool | None = None) -> Path:
    """The repo's export files, from the Hub cache or downloaded into it; the local directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=REPO_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise HubError(f"{repo_id}{'@' + revision if revision else ''}: not in the Hub cache and the Hub "
                       f"cannot be reached ({message_line(error)})") from error
    except HfHubHTTPError as error:
        raise HubError(f"{repo_id}{'@' + revision if revision else ''}: {message_line(error)}") from error


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def card_facts(export_dir: Path) -> dict:
    """What the model card states, from the export and the run around it (``<run>/crosscoder``). A
    stale analysis (``analysis.staleness``: trained since) is left out: the card then gives the
    training's figures."""
    config = _read_json(export_dir / "config.json")
    run_dir = export_dir.parent
    result = _read_json(run_dir / "train_result.json")
    from .analysis import staleness

    summary = {} if staleness(run_dir) else _read_json(run_dir / "analysis" / "summary.json")
    metrics = result.get("last_metrics", {})
    saved = run_dir / "config.toml"
    window = load_config(saved).train.dead_tokens if saved.is_file() else None
    counted = window is None or dead_share(metrics, window) is not None  # no latent can be dead before it
    hooks, fingerprint = config.get("source_models", {}), config.get("data_fingerprint")
    data = Path(str(config.get("data", "")).removeprefix("file://"))
    if (not hooks or not fingerprint) and (data / "manifest.json").is_file():  # exported before they were recorded
        from .shards import Manifest

        manifest = Manifest.from_json((data / "manifest.json").read_text())
        hooks = {s.name: {"model": s.model, "hook": s.hook} for s in manifest.sources}
        fingerprint = manifest.fingerprint()
    return {
        "sources": [{"name": name, "width": width, **hooks.get(name, {})}
                    for name, width in zip(config["sources"], config["widths"])],
        "arch": config["arch"], "activation": config["activation"], "k": config["k"],
        "latents": config["latents"], "tokens_trained": config.get("tokens"),
        "trained_steps": config.get("trained_steps"),
        "fve": summary.get("fve") or metrics.get("fve"),
        "fve_measured_on": measured_on(summary, fingerprint),
        "cross_fve": {pair: v for pair, v in summary.get("cross_fve", {}).items() if len(set(pair.split("->"))) == 2},
        "dead_fraction": metrics.get("dead_fraction") if counted else None,
        "dead_window": None if counted else window,
        "inference_l0": summary.get("inference_l0", metrics.get("inference_l0")),
        "data_fingerprint": fingerprint,
    }


def measured_on(summary: dict, training_data: str | None) -> str:
    """What the card's FVE was measured on: the analysis's tokens, held out only when the analysed
    shards are not the training data (``analyze.data``; by default the analysis reads the tokens it
    trained on), or the last training batch of a run never analysed."""
    if not summary.get("fve"):
        return "the last training batch"
    tokens, analysed = f"{summary.get('tokens', 0):,}", summary.get("data_fingerprint")
    if analysed and training_data and analysed != training_data:
        return f"{tokens} held-out tokens, not of the training data"
    if analysed and analysed == training_data:
        return f"the analysis's {tokens} tokens, of the training data"
    return f"the analysis's {tokens} tokens"


def sparsity_line(facts: dict) -> str:
    """The card's line on how the code is made sparse (k means nothing to relu and jumprelu)."""
    if facts["activation"] in ("topk", "batchtopk"):
        each = " in each source's dictionary" if facts["arch"] == "aligned" else ""
        return f"k (active latents per token{each}): {facts['k']}"
    if facts["activation"] == "jumprelu":
        return "sparsity: a learned threshold per latent (JumpReLU, trained with an L0 penalty)"
    return "sparsity: an L1 penalty weighted by the decoder norms (relu)"


def dictionary(facts: dict) -> str:
    """The card's words for the dictionary: one shared by the sources (acausal), or one per source
    pulled into one space by the alignment loss (aligned: a latent read at one source decodes at another)."""
    n, latents = len(facts["sources"]), f"{facts['latents']:,}"
    if facts["arch"] == "aligned":
        return (f"{latents} latents for each of its {n} sources, aligned into one space by an alignment loss (a "
                "latent read at one source decodes at another)")
    return f"{latents} latents shared by its {n} sources"


def model_card(export_dir: Path, repo_id: str):
    """A ``huggingface_hub.ModelCard`` for the export: metadata in its YAML header, facts as text."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = card_facts(export_dir)
    # the Hub links base_model to model repos: local paths are stated in the table only
    base_models = sorted({s["model"] for s in facts["sources"] if s.get("model") and is_repo_id(s["model"])})
    summary = {k: facts[k] for k in ("arch", "activation", "k", "latents", "tokens_trained", "fve",
                                     "dead_fraction", "inference_l0", "data_fingerprint")}
    data = ModelCardData(library_name=LIBRARY, base_model=base_models or None, crosscoder=summary,
                         tags=["crosscoder", "sparse-dictionary", "interpretability", "model-diffing"])
    rows = "\n".join(f"| {s['name']} | {s['width']} | {s.get('model') or '-'} | {s.get('hook') or '-'} |"
                     for s in facts["sources"])

    def number(value, fmt: str) -> str:
        return "not recorded" if value is None else format(value, fmt)

    fve = ", ".join(f"{k} {v:.4f}" for k, v in (facts["fve"] or {}).items()) or "not recorded"
    dead = number(facts["dead_fraction"], ".2%") if facts["dead_window"] is None else \
        (f"not counted (trained on fewer tokens than train.dead_tokens = {facts['dead_window']:,}, the "
         "silence that makes a latent dead)")
    across = ", ".join(f"{pair.replace('->', ' → ')} {v:.4f}" for pair, v in facts["cross_fve"].items())
    cross = f"- FVE decoding across sources (latents read at one, decoded at another): {across}\n" if across else ""
    text = f"""---
{data.to_yaml()}
---

# {repo_id}

A {facts['activation']} crosscoder ({facts['arch']}) with {dictionary(facts)},
trained with this project's `crosscoder` package.

| source | width | model | hook |
|---|---:|---|---|
{rows}

- {sparsity_line(facts)}
- tokens trained: {number(facts['tokens_trained'], ',')} ({number(facts['trained_steps'], ',')} steps)
- fraction of variance explained ({facts['fve_measured_on']}): {fve}
{cross}- dead latents at the end of training: {dead}
- inference L0 (the exported per-latent thresholds): {number(facts['inference_l0'], '.1f')}
- training data fingerprint (manifest sources and shard checksums): {facts['data_fingerprint'] or 'not recorded'}

## Use

```python
from crosscoder import CrossCoder

model = CrossCoder.from_pretrained("{repo_id}")
# x: [tokens, {sum(s['width'] for s in facts['sources'])}], the sources' raw activations side by side
latents = model.encode(x)
x_hat = model.decode(latents)
```

The weights work on raw activations: the training normalisation is folded in
(`config.json`: `normalization_folded`).
"""
    return ModelCard(text)


def stage(export_dir: str | Path, folder: str | Path, repo_id: str) -> Path:
    """Write what a push uploads into ``folder``: the export's files and the model card."""
    export_dir, folder = Path(export_dir), Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (export_dir / name).is_file():
            raise HubError(f"{export_dir}: not a crosscoder export ({name} is missing); train the run first")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(export_dir / name, folder / name)
    model_card(export_dir, repo_id).save(folder / "README.md")
    return folder


def push(export_dir: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
         token: str | bool | None = None, commit_message: str = "Upload crosscoder") -> str:
    """Create the repo if needed and upload the export with its card; returns the commit's URL."""
    import tempfile

    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="crosscoder-push-") as tmp:
        folder = stage(export_dir, tmp, repo_id)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     commit_message=commit_message)
        except OfflineModeIsEnabled as error:
            raise HubError(f"{repo_id}: cannot push, HF_HUB_OFFLINE is set ({message_line(error)})") from error
        except HfHubHTTPError as error:
            raise HubError(f"{repo_id}: push failed: {message_line(error)}") from error
        except (OSError, httpx2.TransportError) as error:  # connection refused, DNS, timeouts
            raise HubError(f"{repo_id}: the Hub cannot be reached: {message_line(error)}") from error
    return str(info.commit_url)
