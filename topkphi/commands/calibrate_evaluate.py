"""`topkphi calibrate --evaluate F`: a phi file on held-out text against Top-K only at matched reads.

Errors of the attention output vs dense replayed with the float64 oracle at the text's last positions,
optionally after a per-prompt refit (``--per-prompt S``: a time budget, ``fit_within``) and with the
next-token KL of decoding the text's last tokens (``--kl-tokens``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np


def _prompt_prefix(layers, end: int, n_last: int | None):
    """The prompt's captures (everything before ``end``), optionally with only its last ``n_last`` queries:
    the queries nearest the decode steps have mids most like theirs, and a fit on fewer is faster."""
    from topkphi.calibration.replay import truncate
    from topkphi.capture import LayerCapture

    prefix = [truncate(c, end) for c in layers]
    if n_last is None:
        return prefix
    return [LayerCapture(c.q[:, :, -n_last:], c.k, c.v, c.scale) for c in prefix]


def next_token_kl(runner, ids: list[int], n_tokens: int, cfg, maps_by_method: dict) -> dict:
    """``{method: (mean KL, max KL)}``: KL(dense || method) of the next-token distribution at the last
    ``n_tokens`` positions, teacher-forced after one dense prefill (as ``topkphi eval``'s KL task does).

    ``maps_by_method``: ``{name: per-layer maps or None}``; None runs Top-K only at the budget matched
    to the first entry that has maps (SPEC section 6)."""
    from topkphi.evaluation import scoring
    from topkphi.evaluation.policies import policy

    start = len(ids) - n_tokens
    snapshot = runner.prefill(ids[: start - 1])
    feed = ids[start - 1 : len(ids) - 1]

    def logits(pol):
        session = runner.session(snapshot, pol)
        return np.stack([session.step(t) for t in feed])

    n, d = len(ids), runner.d
    ref = logits(policy("dense", None, cfg, n, d, runner.dv))
    any_maps = next(m for m in maps_by_method.values() if m is not None)
    out = {}
    for name, maps in maps_by_method.items():
        if maps is None:
            pol = policy("topk", cfg.top_k, cfg, n, d, runner.dv, any_maps)
        else:
            pol = policy("topk+phi", cfg.top_k, cfg, n, d, runner.dv, maps)
        kl = scoring.kl_divergence(ref, logits(pol))
        out[name] = (float(kl.mean()), float(kl.max()))
    return out


def evaluate_file(err, runtime, net, tokenizer, seqs, model_id, phi_file, maps, opts, n_queries, per_prompt,
                  json_out, kl_tokens: int = 0, per_prompt_queries: int | None = None) -> None:
    """Measure ``maps`` (the file's, checked against the model) on each token sequence of ``seqs``."""
    import topkphi
    from topkphi.calibration.prompt import fit_within
    from topkphi.calibration.replay import replay_errors

    d = maps[0].d
    cfg = topkphi.Config(n_sink=opts.n_sink, n_tail=opts.n_tail, top_k=opts.top_k, feature_map=maps[0])
    matched = topkphi.matched_top_k(cfg, d, d)
    results = {
        "model": model_id,
        "phi_file": str(phi_file),
        "n_tokens": len(seqs[0]),
        "n_sink": opts.n_sink,
        "n_tail": opts.n_tail,
        "top_k": opts.top_k,
        "top_k_matched": matched,
        "kl_tokens": kl_tokens,
        "texts": [],
    }
    for ids in seqs:
        with err.status(f"capturing {len(ids)} tokens"):
            layers = runtime.capture(net, ids)
        positions = list(range(len(ids) - n_queries, len(ids)))
        with err.status("replaying decode steps with the float64 oracle"):
            e_top = replay_errors(layers, positions, opts.n_sink, opts.n_tail, matched, None)
            e_phi = replay_errors(layers, positions, opts.n_sink, opts.n_tail, opts.top_k, maps)
        row = {
            "err_top_k_matched": float(e_top.mean()),
            "err_phi": float(e_phi.mean()),
            "per_layer_top_k": e_top.mean((1, 2)).tolist(),
            "per_layer_phi": e_phi.mean((1, 2)).tolist(),
        }
        prompt_maps = None
        if per_prompt is not None:
            # the prompt: everything before the first replayed (or KL-decoded) step
            prefill = _prompt_prefix(layers, len(ids) - max(n_queries, kl_tokens), per_prompt_queries)
            start = time.perf_counter()
            with err.status(f"per-prompt fit ({per_prompt:g} s budget)"):
                fitted = fit_within(prefill, opts, maps, seconds=per_prompt)
            if fitted.note:
                err.print(f"per-prompt fit: {fitted.note}", style="dim", markup=False, soft_wrap=True)
            row["per_prompt_seconds"] = time.perf_counter() - start
            row["per_prompt_steps"] = int(np.mean([0 if f is None else f.steps for f in fitted.fits]))
            # a layer the budget gave no step keeps the file's map
            prompt_maps = [maps[i] if f is None else f.fmap for i, f in enumerate(fitted.fits)]
            e_pp = replay_errors(layers, positions, opts.n_sink, opts.n_tail, opts.top_k, prompt_maps)
            row["err_phi_prompt"] = float(e_pp.mean())
            row["per_layer_phi_prompt"] = e_pp.mean((1, 2)).tolist()
        if kl_tokens:
            with err.status(f"decoding the last {kl_tokens} tokens for KL"):
                methods = {"top_k_matched": None, "phi": maps}
                if prompt_maps is not None:
                    methods["phi_prompt"] = prompt_maps
                kl = next_token_kl(runtime.runner(net, tokenizer), ids, kl_tokens, cfg.replace(feature_map=None),
                                   methods)
            for name, (mean, worst) in kl.items():
                row[f"kl_{name}"], row[f"kl_max_{name}"] = mean, worst
        results["texts"].append(row)
        line = (
            f"N={len(ids)} top_k={opts.top_k}: Top-K only (top_k {matched}) {row['err_top_k_matched']:.4f}, "
            f"+ learned phi {row['err_phi']:.4f} ({row['err_top_k_matched'] / row['err_phi']:.2f}x)"
        )
        if per_prompt is not None:
            line += (
                f", per-prompt {row['err_phi_prompt']:.4f} ({row['err_top_k_matched'] / row['err_phi_prompt']:.2f}x,"
                f" {row['per_prompt_seconds']:.1f} s)"
            )
        if kl_tokens:
            line += "; KL " + ", ".join(f"{k[3:]} {v:.4f}" for k, v in row.items() if k.startswith("kl_") and
                                        not k.startswith("kl_max"))
        click.echo(line)
    keys = ["err_top_k_matched", "err_phi"] + (["err_phi_prompt"] if per_prompt is not None else [])
    if kl_tokens:
        keys += ["kl_top_k_matched", "kl_phi"] + (["kl_phi_prompt"] if per_prompt is not None else [])
    results["mean"] = {k: float(np.mean([r[k] for r in results["texts"]])) for k in keys}
    m = results["mean"]
    line = "mean: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
    line += f"; error ratio {m['err_top_k_matched'] / m['err_phi']:.2f}x"
    if kl_tokens:
        line += f", KL ratio {m['kl_top_k_matched'] / max(m['kl_phi'], 1e-12):.2f}x"
    click.echo(line)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
