"""Per-latent dashboards for Neuronpedia-style viewers, from the analysis's top activations.

Format: Neuronpedia's dashboard batch, as SAEDashboard's ``NeuronpediaRunner`` writes it for upload
(``batch-<n>.json``: ``model_id``, ``layer``, ``sae_set``, ``settings`` and ``features``; each
feature has exactly the keys of SAEDashboard's ``NeuronpediaDashboardFeature``, read from its source,
``sae_dashboard/neuronpedia/neuronpedia_feature.py`` at commit 6b20386). What fills them:

- ``activations``: the latent's top-n examples from the analysis (its running top-n over the
  analysed tokens, ``analysis/top_activations.npz``), each a window of decoded tokens around the
  token (``analyze.context`` before, 3 after, within the document) with the latent's activation on
  *every* token of the window, in one "top activations" bin (``bin_min`` -1, ``bin_max`` the
  latent's max, ``bin_contains`` -1, SAEDashboard's values for that group);
- ``frac_nonzero``: the analysis's firing frequency; ``num_tokens_for_dashboard``: tokens analysed;
- ``freq_hist_data_bar_*``: a histogram of the examples' peak activations (not of all firings: the
  analysis keeps no per-latent histogram);
- left empty: the logit tables (the export has no unembedding) and the correlated neurons/features.

What the schema has no key for, a crosscoder's per-source decoder norms, goes beside the batches in
``crosscoder.json``: per latent, the decoder norm in each source (raw units, as exported), and from
``latents.csv`` each source's share (``norm.<source>``: normalised units, per dimension, where
sources of different scales and widths compare), the class and the relative norm.

Why another read of the shards: the analysis keeps each example's value at its token only, and a
dashboard colours every token of the window. The export reads the analysed tokens once more in
manifest order, up to the last example, after checking that the shards are the ones analysed (their
fingerprint), and encodes in each document only the rows of the windows that fall in it. Cost: one
read of the analysed tokens, and the windows' values kept until they are written (for L = 64k, n =
20, 16 tokens: ~20M numbers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .analysis import (
    TOP_FILE,
    AnalysisError,
    _Decoder,
    context_window,
    read_latents_csv,
    read_summary,
    read_top_activations,
    staleness,
)
from .metrics import decoder_norms
from .model import CrossCoder
from .progress import progress_bar
from .shards import iter_samples, read_manifest
from .storage import Root

# the keys of SAEDashboard's NeuronpediaDashboardFeature (commit 6b20386), in its order
FEATURE_KEYS = ("feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "num_tokens_for_dashboard", "activations")


def neuronpedia_names(export_config: dict) -> tuple[str, int]:
    """The ``model_id`` and ``layer`` Neuronpedia files a crosscoder's dashboards under, from its
    export's ``config.json``: its first source's model as Neuronpedia names models (the repo's name
    in lower case: ``HuggingFaceTB/SmolLM2-135M`` → ``smollm2-135m``) and the first number in that
    source's hook (``model.layers.13`` → 13); ``""`` and 0 where the export names no model (planted
    data)."""
    first: dict = next(iter(export_config.get("source_models", {}).values()), {})
    layer = re.search(r"\d+", first.get("hook", ""))
    return Path(first.get("model", "")).name.lower(), int(layer.group()) if layer else 0


def export_dashboards(run_dir: str | Path, root: Root, out_dir: str | Path, context: int = 12, sae_set: str = "",
                      model_id: str | None = None, layer: int | None = None, features_per_batch: int = 128,
                      progress: bool = True) -> dict:
    """Write ``batch-<n>.json`` (Neuronpedia's schema) and ``crosscoder.json`` for every live latent
    of the analysed run ``run_dir``, each example with ``context`` tokens before its token (the
    run's ``analyze.context``); ``model_id`` and ``layer`` default to :func:`neuronpedia_names`.
    Returns counts and those names for the command's message."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    analysis_dir = run_dir / "analysis"
    for path in (analysis_dir / TOP_FILE, analysis_dir / "latents.csv", run_dir / "crosscoder" / "model.safetensors"):
        if not path.is_file():
            raise AnalysisError(f"{path} is missing: analyse the run first (crosscoder analyze --run {run_dir})")
    if why := staleness(run_dir):  # its examples are another dictionary's
        raise AnalysisError(f"{analysis_dir} predates {run_dir / 'crosscoder'} ({why}): analyse the "
                            f"run again first (crosscoder analyze --run {run_dir})")
    top = read_top_activations(run_dir)
    columns = read_latents_csv(analysis_dir / "latents.csv")
    manifest = read_manifest(root)
    if str(top["fingerprint"]) != manifest.fingerprint():
        raise AnalysisError(f"{root.url}: these shards are not the ones {analysis_dir} analysed (fingerprint "
                            f"{manifest.fingerprint()}, analysed {top['fingerprint']}); pass the analysed data")
    model = CrossCoder.from_pretrained(run_dir / "crosscoder")
    if len(columns["index"]) != model.spec.latents:  # cut short at a line's end
        raise AnalysisError(f"{analysis_dir / 'latents.csv'}: {len(columns['index'])} latents, the crosscoder has "
                            f"{model.spec.latents} (the file was cut short); `crosscoder analyze {run_dir}` writes it "
                            "again")
    summary = read_summary(run_dir) if (analysis_dir / "summary.json").is_file() else {}
    top_values, top_index, analysed = top["values"], top["index"], int(top["tokens"])
    live = np.flatnonzero(columns["class"] != "dead")

    # every (latent, example) with a positive value, and its token's global index in the analysed stream
    lat, slot = np.nonzero(top_values[live] > 0)
    lat = live[lat]
    index = top_index[lat, slot]
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    end = min(int(sorted_index[-1]) + 1 if len(index) else 0, analysed)
    tokens: list = [None] * len(lat)  # per example: the window's token ids, and the latent's value on each
    values: list = [None] * len(lat)
    seen = 0
    bar = progress_bar(total=end, desc="dashboards", unit="tok", unit_scale=True, disable=not progress)
    with torch.no_grad():
        for sample in iter_samples(root, manifest):  # one read, in the analysis's order, to the last example
            if seen >= end:
                break
            n = min(len(sample.tokens), analysed - seen)
            a, b = np.searchsorted(sorted_index, [seen, seen + n])
            if b > a:
                mine = order[a:b]
                lo, hi = context_window(index[mine] - seen, 0, n, context)  # within this document
                rows = np.unique(np.concatenate([np.arange(first, stop) for first, stop in zip(lo, hi)]))
                x = torch.from_numpy(np.ascontiguousarray(sample.acts[rows])).float()
                f = model.encode(x).amax(1)  # [rows, L]: acausal has one group; aligned, active in any source
                for e, first, stop in zip(mine.tolist(), lo.tolist(), hi.tolist()):
                    at = torch.from_numpy(np.searchsorted(rows, np.arange(first, stop)))
                    values[e] = f[at, int(lat[e])].tolist()
                    tokens[e] = sample.tokens[first:stop]
            seen += n
            bar.update(min(seen, end) - bar.n)  # the last sample read may reach past the last example
    bar.close()

    decoder = _Decoder(manifest, root)  # the tokenizer, where it is now (a run directory moved since)
    norms = decoder_norms(model.W_dec.detach(), model.spec.slices).numpy()  # raw units, as exported
    out_dir.mkdir(parents=True, exist_ok=True)
    features = []
    by_latent: dict[int, list[int]] = {}
    for e, latent in enumerate(lat.tolist()):
        by_latent.setdefault(latent, []).append(e)
    for latent in live.tolist():
        examples = [{"bin_min": -1, "bin_max": float(top_values[latent, 0]), "bin_contains": -1,
                     "tokens": decoder.pieces(tokens[e]), "values": [round(v, 4) for v in values[e]]}
                    for e in by_latent.get(latent, [])]
        centres, heights = _histogram(top_values[latent][top_values[latent] > 0])
        features.append({
            "feature_index": latent, "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [], "correlated_neurons_indices": [], "correlated_neurons_l1": [],
            "correlated_neurons_pearson": [], "correlated_features_indices": [], "correlated_features_l1": [],
            "correlated_features_pearson": [], "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
            "frac_nonzero": float(columns["frequency"][latent]),
            "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": heights,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "num_tokens_for_dashboard": analysed, "activations": examples})
    sae_set = sae_set or run_dir.name
    named_id, named_layer = neuronpedia_names(json.loads((run_dir / "crosscoder" / "config.json").read_text()))
    model_id = named_id if model_id is None else model_id
    layer = named_layer if layer is None else layer
    batches = 0
    for b in range(0, len(features), features_per_batch):
        batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                 "features": features[b:b + features_per_batch],
                 "settings": {"n_batches_to_sample_from": 0, "n_prompt_to_select": 0}}
        (out_dir / f"batch-{batches}.json").write_text(json.dumps(batch) + "\n")
        batches += 1
    sidecar = {"sources": model.spec.sources, "tokens_analysed": analysed, "data_fingerprint": manifest.fingerprint(),
               "fve": summary.get("fve"), "latents": [
                   {"index": int(i), "class": str(columns["class"][i]), "rel_norm": float(columns["rel_norm"][i]),
                    "frequency": float(columns["frequency"][i]),
                    "decoder_norm": dict(zip(model.spec.sources, norms[i].astype(float).tolist())),
                    "decoder_share": {s: float(columns[f"norm.{s}"][i]) for s in model.spec.sources}}
                   for i in live]}
    (out_dir / "crosscoder.json").write_text(json.dumps(sidecar) + "\n")
    return {"features": len(features), "batches": batches, "examples": len(lat), "out": out_dir,
            "model_id": model_id, "layer": layer, "sae_set": sae_set}


def _histogram(peaks: np.ndarray) -> tuple[list[float], list[float]]:
    """Bar centres and heights of the examples' peak activations (up to 10 bars)."""
    if not len(peaks):
        return [], []
    heights, edges = np.histogram(peaks, bins=min(10, len(peaks)))
    return [round(float(c), 4) for c in (edges[:-1] + edges[1:]) / 2], [float(h) for h in heights]
