"""The model-diffing report: one self-contained HTML file with the plots embedded as PNG.

Why one file with inline images and no JavaScript: it opens in any browser from a laptop, a
cluster's object store or a CI artifact, with no server and nothing to fetch. What it costs: no
interactivity (sorting and filtering are done on ``latents.csv``, which holds every number shown).

Plots (matplotlib, Agg backend): relative decoder norm histogram, decoder cosine histogram,
Latent Scaling ``ν_ε`` vs ``ν_r`` scatter of the exclusive latents, FVE and CE loss recovered per
source, firing-frequency histogram. Then the counts, the artifact table, token attribution per
class (with how many latents of each class fire mostly on the special tokens) and the
max-activating examples of the most active latents of each class.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import numpy as np

from .analysis import Analysis, class_names
from .ce_recovered import meaningful, why_not_meaningful

COLORS = {"shared": "#7f7f7f", "base_only": "#1f77b4", "chat_only": "#d62728", "dead": "#bbbbbb"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def latent_scaling_figure(analysis: Analysis):
    """The exclusive latents' ``ν_ε`` against ``ν_r``, the flag threshold on each axis; with none to
    scale, the empty axes say so."""
    c, named = analysis.columns, class_names(analysis.sources)
    fig, ax = _pyplot().subplots(figsize=(5, 4.2))
    t = analysis.scaling_threshold
    drawn = 0
    for cls in ("base_only", "chat_only"):
        m = (c["class"] == cls) & np.isfinite(c["nu_error"]) & np.isfinite(c["nu_recon"])
        ax.scatter(c["nu_error"][m], c["nu_recon"][m], s=12, alpha=0.7, color=COLORS[cls],
                   label=f"{named[cls]} ({int(m.sum())})")
        drawn += int(m.sum())
    if not drawn:
        ax.text(0.5, 0.62, textwrap.fill(f"no {named['base_only']} or {named['chat_only']} latents to scale", 46),
                transform=ax.transAxes, ha="center", fontsize=9, color="#555555")  # long source names wrap
    ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.axhline(t, color="k", ls="--", lw=0.8)
    finite = np.concatenate([c["nu_error"][np.isfinite(c["nu_error"])], c["nu_recon"][np.isfinite(c["nu_recon"])]])
    top = max(1.1, float(np.percentile(finite, 99)) + 0.1) if len(finite) else 1.1
    ax.set_xlim(-0.1, top)
    ax.set_ylim(-0.1, top)
    ax.set_xlabel("ν_ε  (error: Complete Shrinkage →)")
    ax.set_ylabel("ν_r  (reconstruction: Latent Decoupling →)")
    ax.legend(fontsize=8)
    return fig


def fve_and_ce_figure(analysis: Analysis):
    """FVE and CE loss recovered per source, each bar labelled with its value. The axis spans every
    value drawn (a CE loss recovered below 0, a reconstruction worse than zero-ablation, or above 1);
    a CE loss recovered that is not a score (zero-ablation barely moves the loss: an untrained model)
    is said so in place of its bar."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.2))
    names = list(analysis.fve)
    xs = np.arange(len(names))
    drawn = [analysis.fve[n] for n in names]
    ax.bar_label(ax.bar(xs - 0.2, drawn, width=0.4, label="FVE", color="#2ca02c"), fmt="%.3f", fontsize=7)
    scored_at, scored = [], []
    for x, n in zip(xs, names):
        if (ce := analysis.ce_recovered.get(n)) is None:
            continue
        if meaningful(ce["clean"], ce["zero_ablated"]):
            scored_at.append(x + 0.2)
            scored.append(ce["recovered"])
        else:
            ax.text(x + 0.2, 0.02, "CE loss recovered:\nnot meaningful", rotation=90, ha="center", va="bottom",
                    fontsize=7, color="#555555")
    if scored:
        ax.bar_label(ax.bar(scored_at, scored, width=0.4, label="CE loss recovered", color="#9467bd"), fmt="%.3f",
                     fontsize=7)
        drawn += scored
    crowded = sum(map(len, names)) > 60  # e.g. four model@hook names: each breaks before its hook
    ax.set_xticks(xs, [n.replace("@", "\n@") if crowded else n for n in names], fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)  # a source's place whether or not its CE bar is drawn
    low = min(0.0, *drawn)
    ax.set_ylim(low - (0.12 if low < 0 else 0.0), max(1.0, *drawn) + 0.1)  # room for the value labels
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16 if crowded else -0.1), ncol=2,
              frameon=False)  # under the bars and their names
    return fig


def figures(analysis: Analysis) -> dict[str, str]:
    """Title → base64 PNG."""
    plt = _pyplot()

    c = analysis.columns
    live = c["class"] != "dead"
    base, chat = analysis.sources
    out = {}

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(c["rel_norm"][live], bins=np.linspace(0, 1, 41).tolist(), color="#444444")
    for t in (analysis.exclusive_threshold, 1 - analysis.exclusive_threshold):
        ax.axvline(t, color="#d62728", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"relative decoder norm  (0 = only {base}, 1 = only {chat})")
    ax.set_ylabel("live latents")
    out["Relative decoder norm"] = _png(fig)

    if np.isfinite(c["cosine"][live]).any():  # none between sources of different widths
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for cls in ("shared", "base_only", "chat_only"):
            vals = c["cosine"][(c["class"] == cls) & np.isfinite(c["cosine"])]
            if len(vals):
                ax.hist(vals, bins=np.linspace(-1, 1, 41).tolist(), alpha=0.6,
                        label=class_names(analysis.sources)[cls], color=COLORS[cls])
        ax.set_xlabel(f"decoder cosine between {base} and {chat}")
        ax.set_ylabel("latents")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        out["Decoder cosine"] = _png(fig)

    if not analysis.scaling_skipped:  # aligned runs, sources of different widths
        fig = latent_scaling_figure(analysis)
        out["Latent Scaling of exclusive latents"] = _png(fig)

    fig = fve_and_ce_figure(analysis)
    out["FVE and CE loss recovered per source"] = _png(fig)

    profile_names = [k for k in c if k.startswith("norm.")]
    if len(profile_names) > 2:  # more than a pair: each latent's decoder-norm share per source
        shares = np.stack([c[k] for k in profile_names], 1)[live]
        order = np.lexsort((-shares.max(1), shares.argmax(1)))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        image = ax.imshow(shares[order].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(profile_names)), [k[5:] for k in profile_names], fontsize=8)
        ax.set_xlabel("live latents, by the source they decode most into")
        fig.colorbar(image, ax=ax, label="share of the decoder norm")
        out["Decoder-norm profile over all sources"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    freq = c["frequency"][live]
    if len(freq):
        ax.hist(np.log10(np.maximum(freq, 1e-9)), bins=40, color="#444444")
    ax.set_xlabel("log10 firing frequency (live latents)")
    ax.set_ylabel("latents")
    out["Firing frequency"] = _png(fig)
    return out


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _example_html(ex) -> str:
    parts = []
    for i, piece in enumerate(ex.tokens):
        text = html.escape(piece if piece.strip() else repr(piece))
        parts.append(f"<b class='hit'>{text}</b>" if i == ex.position else text)
    # one width for every value (two decimals, right-aligned), so the contexts line up
    return f"<div class='ex'><span class='v'>{ex.value:9.2f}</span> " + " ".join(parts) + "</div>"


def dictionary_line(arch: str, activation: str, k: int) -> str:
    """The report's words for which crosscoder it analysed: `aligned, batchtopk (k 16)`."""
    sparsity = {"relu": "relu with an L1 penalty", "jumprelu": "jumprelu"}.get(activation, f"{activation} (k {k})")
    return f"{arch}, {sparsity}"


def render(analysis: Analysis, title: str = "Crosscoder model-diffing report", crosscoder: str = "") -> str:
    """The report's HTML; ``crosscoder`` (:func:`dictionary_line`) names the analysed dictionary's
    kind in the summary table, beside its sources and size."""
    c = analysis.columns
    base, chat = analysis.sources
    counts = analysis.class_counts()
    arts = analysis.artifact_counts()
    summary_rows: list[list] = [["sources compared", f"{base} vs {chat}"], ["tokens analysed", f"{analysis.tokens:,}"],
                    ["latents", f"{len(c['class']):,}"]]
    if crosscoder:
        summary_rows.insert(0, ["crosscoder", crosscoder])
    named = class_names(analysis.sources)
    summary_rows += [[f"{named[k]} latents", v] for k, v in counts.items()]
    summary_rows += [[f"FVE {k}", f"{v:.4f}"] for k, v in analysis.fve.items()]
    summary_rows.append(["inference L0 (active latents per token, as encode() fires them)",
                         f"{analysis.inference_l0:.1f}"])
    summary_rows += [[f"CE loss recovered {k}", f"{v['recovered']:.4f} (clean {v['clean']:.3f}, spliced "
                      f"{v['spliced']:.3f}, zero-ablated {v['zero_ablated']:.3f} nats)"
                      + ("" if meaningful(v["clean"], v["zero_ablated"]) else
                         f"; not meaningful: {why_not_meaningful(v['clean'], v['zero_ablated'])}")]
                     for k, v in analysis.ce_recovered.items()]
    sources = [k[5:] for k in c if k.startswith("norm.")]
    if len(sources) > 2:  # the pairwise classes are one pair's; this is every source's
        summary_rows += [[f"live latents decoding into {k.replace('+', ' + ') or 'none'}", v]
                         for k, v in analysis.present_counts().items()]
    cross = ""
    if analysis.cross_fve:
        names = list(analysis.fve)
        matrix = [[f"from {s}"] + [f"{analysis.cross_fve.get(f'{s}->{t}', float('nan')):.3f}" for t in names]
                  for s in names]
        cross = ("<h2>Cross-source mapping</h2><p>FVE of each source's activations decoded from another source's "
                 "latents (aligned variant: encode at one source, a layer or a model, and decode at another); "
                 "the diagonal is each source's own reconstruction.</p>"
                 + _table(matrix, ["", *[f"to {t}" for t in names]]))
    art_rows = [[named[cls], a["latents"], a["complete_shrinkage"], a["latent_decoupling"], a["untrained_tokens"],
                 a["flagged"], a["latents"] - a["flagged"]] for cls, a in arts.items()]
    parts = [f"<h1>{html.escape(title)}</h1>",
             _table(summary_rows, ["", ""]),
             "".join(f"<p class='note'>{html.escape(n)}</p>" for n in analysis.notes),
             "<h2>Latent Scaling</h2>",
             f"<p>Not run: {html.escape(analysis.scaling_skipped)}.</p>" if analysis.scaling_skipped else
             f"<p>Exclusive latents (relative norm below {analysis.exclusive_threshold} or above "
             f"{1 - analysis.exclusive_threshold}) flagged when ν exceeds {analysis.scaling_threshold}: "
             "ν_ε high = Complete Shrinkage (the other model's error still holds the concept), ν_r high = "
             "Latent Decoupling (other latents reconstruct it in the other model). arXiv 2504.02922. "
             f"Untrained tokens: {named['base_only']} latents firing mostly on the tokenizer's special tokens "
             f"(the chat template), whose embeddings {analysis.sources[0]} never trained.</p>"
             + _table(art_rows, ["class", "latents", "complete shrinkage", "latent decoupling", "untrained tokens",
                                 "flagged", "really exclusive"]),
             cross,
             "<h2>Plots</h2>"]
    for name, png in figures(analysis).items():
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("<h2>Token attribution</h2><p>Tokens the latents of each class fire on most; lift = share of "
                 "the class's firings / share of all tokens (1 = no preference).</p>")
    special = analysis.special_token_counts()
    if special:
        parts.append("<p>Latents firing mostly (more than half of their firings) on the tokenizer's special "
                     "tokens, the chat template:</p>" + _table(
                         [[named[cls], s["latents"], s["mostly_special"]]
                          + ([] if analysis.scaling_skipped else [s.get("kept_mostly_special", "—")])
                          for cls, s in special.items()],
                         ["class", "latents", "mostly on special tokens"]
                         + ([] if analysis.scaling_skipped else ["of them kept by Latent Scaling"])))
    for cls, rows in analysis.attribution.items():
        table = [[r["token"], r["id"], f"{r['share']:.1%}", f"{r['lift']:.2f}", r["firings"]] for r in rows]
        parts.append(f"<h3>{named[cls]}</h3>" + (_table(table, ["token", "id", "share", "lift", "firings"]) if table
                                          else "<p>no firings</p>"))
    parts.append("<h2>Max-activating examples</h2>")
    for latent, examples in analysis.examples.items():
        i = int(latent)
        desc = (f"latent {i}: {named[c['class'][i]]}, frequency {c['frequency'][i]:.2e}, "
                f"rel norm {c['rel_norm'][i]:.3f}")
        if np.isfinite(c["cosine"][i]):
            desc += f", cosine {c['cosine'][i]:.3f}"
        if np.isfinite(c["nu_error"][i]):
            desc += f", ν_ε {c['nu_error'][i]:.2f}, ν_r {c['nu_recon'][i]:.2f}"
        if c["artifact"][i]:
            desc += f" [{c['artifact'][i]}]"
        parts.append(f"<h3>{html.escape(desc)}</h3>" + "".join(_example_html(e) for e in examples))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px;text-align:left}figure{display:inline-block;margin:0.5em}"
             ".ex{font-family:monospace;font-size:12px;white-space:pre-wrap}.hit{background:#ffd54f}"
             ".v{color:#888;white-space:pre;font-family:monospace}.note{color:#a15c00}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(analysis: Analysis, path: Path, title: str = "Crosscoder model-diffing report",
                 crosscoder: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(analysis, title, crosscoder))
    return path
