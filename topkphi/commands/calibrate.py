"""`topkphi calibrate`: fit learned feature maps on calibration text, save them, and measure them.

    topkphi calibrate --model smollm2-135m --builtin --out phi.safetensors
    topkphi calibrate --model smollm2-135m --evaluate phi.safetensors --tokens 2048 --top-k 64

Also the helpers model commands use for ``--phi-file`` / ``--feature-map learned``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from topkphi.capture import capture_ids
from topkphi.commands.errors import user_errors
from topkphi.commands.runtime import RUNTIMES, resolve_runtime

# ---- helpers for chat / inspect-heads / eval -------------------------------------------------------------


def phi_file_option(fn):
    """``--phi-file F``: learned maps from ``topkphi calibrate`` (needed by ``--feature-map learned``)."""
    return click.option(
        "--phi-file",
        default=None,
        type=click.Path(dir_okay=False),
        help="Learned feature maps from `topkphi calibrate` (for --feature-map learned).",
    )(fn)


def check_phi_options(feature_map: str, phi_file: str | None) -> None:
    if feature_map == "learned" and phi_file is None:
        raise click.UsageError("--feature-map learned needs --phi-file (make one with `topkphi calibrate`)")
    if phi_file is not None and feature_map not in ("learned", "learned-prompt"):
        raise click.UsageError("--phi-file is used only with --feature-map learned or learned-prompt")


def fingerprint(net, model_id: str, framework: str):
    from topkphi.calibration.phi_file import mlx_fingerprint, torch_fingerprint

    return torch_fingerprint(net, model_id) if framework == "torch" else mlx_fingerprint(net, model_id)


def load_layer_maps(phi_file: str, net, model_id: str, framework: str, cfg=None, warn: Callable[[str], None] = None):
    """The file's per-layer maps, checked against the loaded model (ValueError: one line)."""
    from topkphi.calibration.phi_file import load_phi

    maps, meta = load_phi(phi_file, fingerprint(net, model_id, framework))
    if cfg is not None and warn is not None:
        fitted = (meta.n_sink, meta.n_tail, meta.top_k)
        if fitted != (cfg.n_sink, cfg.n_tail, cfg.top_k):
            warn(
                f"note: {Path(phi_file).name} was fitted for n_sink/n_tail/top_k {fitted}, "
                f"running with {(cfg.n_sink, cfg.n_tail, cfg.top_k)}"
            )
    return maps


# ---- capture ----------------------------------------------------------------------------------------------------


def load_model(model: str, backend: str):
    runtime = resolve_runtime(backend)
    from topkphi.models import resolve

    if runtime.framework == "torch":
        net, tokenizer = resolve.load_torch_model(model, device=runtime.device)
    else:
        net, tokenizer = resolve.load_mlx_model(model)
    return net, tokenizer, runtime


def calibration_texts(data: tuple[str, ...], builtin: bool, split: str) -> dict[str, str]:
    from topkphi.calibration import data as cal_data

    if data and builtin:
        raise ValueError("give --data FILE ... or --builtin, not both")
    if data:
        return cal_data.read_files(data)
    return cal_data.builtin_texts(split)


# ---- the command ----------------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--model", "-m", default="smollm2-135m", show_default=True, help="Alias, local HF folder, .gguf file or hub id."
)
@click.option(
    "--backend",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    help="Runtime that runs the model for the capture (the fit itself runs in torch on the CPU).",
)
@click.option("--data", multiple=True, type=click.Path(), help="Calibration text file(s); repeatable.")
@click.option("--builtin", is_flag=True, help="Built-in Gutenberg plays (default when no --data is given).")
@click.option("--n-features", type=int, default=32, show_default=True, help="Feature-map size m.")
@click.option("--n-sink", type=int, default=4, show_default=True)
@click.option("--n-tail", type=int, default=64, show_default=True)
@click.option("--top-k", type=int, default=64, show_default=True, help="The budget the maps are fitted for.")
@click.option("--tokens", type=int, default=2048, show_default=True, help="Tokens per calibration sequence.")
@click.option("--sequences", type=int, default=1, show_default=True, help="Calibration sequences (one per text).")
@click.option("--steps", type=int, default=300, show_default=True, help="Adam steps per layer.")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--stride", type=int, default=8, show_default=True, help="One calibration query every STRIDE positions.")
@click.option(
    "--merge-weight",
    type=float,
    default=10.0,
    show_default=True,
    help="Weight of the merged output's error vs dense, next to the log-mass and value terms.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--extra-top-k",
    type=int,
    multiple=True,
    help="Also fit for this budget (repeatable): one map for several top_k instead of one per budget.",
)
@click.option(
    "--validation",
    type=int,
    default=0,
    show_default=True,
    help="Hold out the last V calibration sequences and keep the iterate with the best loss on them "
    "(early stopping); needs --sequences > V.",
)
@click.option("--patience", type=int, default=0, show_default=True, help="With --validation: stop after this many "
              "validation scores (every 5 steps) without improvement; 0 runs all --steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True,
              help="Pull the parameters toward the initial (or warm-start) map.")
@click.option("--tie", is_flag=True, help="W_k = W_q (shared directions, separate biases): half the parameters.")
@click.option("--optimizer", type=click.Choice(["adam", "lbfgs"]), default="adam", show_default=True)
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="Where to write the phi file.")
@click.option(
    "--evaluate",
    "evaluate_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Instead of fitting: measure this phi file on held-out text (built-in held-out plays "
    "unless --data is given) against Top-K only at matched reads.",
)
@click.option(
    "--n-queries",
    type=int,
    default=8,
    show_default=True,
    help="--evaluate: decode steps replayed per text (the last positions).",
)
@click.option(
    "--per-prompt",
    type=float,
    default=None,
    help="--evaluate: also refine the maps on each text's own prefill for this many seconds.",
)
@click.option(
    "--per-prompt-queries",
    type=int,
    default=None,
    help="--per-prompt: fit on the prompt's last Q queries only (default: all of them).",
)
@click.option(
    "--kl-tokens",
    type=int,
    default=0,
    show_default=True,
    help="--evaluate: also decode the last T tokens of each text with the model (dense prefill before them) "
    "and report KL(dense || method) of the next-token distribution.",
)
@click.option("--json", "json_out", default=None, help="--evaluate: write the numbers as JSON here.")
@user_errors
def calibrate(
    model,
    backend,
    data,
    builtin,
    n_features,
    n_sink,
    n_tail,
    top_k,
    tokens,
    sequences,
    steps,
    lr,
    stride,
    merge_weight,
    seed,
    extra_top_k,
    validation,
    patience,
    weight_decay,
    tie,
    optimizer,
    out,
    evaluate_file,
    n_queries,
    per_prompt,
    per_prompt_queries,
    kl_tokens,
    json_out,
) -> None:
    """Fit learned feature maps per (layer, KV head) on calibration text and save them (safetensors)."""
    from rich.console import Console

    from topkphi.calibration.fit import FitOptions, min_tokens, require_torch

    err = Console(stderr=True, highlight=False)
    if tokens < 1 or sequences < 1 or n_queries < 1:
        raise ValueError("--tokens, --sequences and --n-queries must be >= 1")
    opts = FitOptions(
        n_features=n_features,
        n_sink=n_sink,
        n_tail=n_tail,
        top_k=top_k,
        steps=steps,
        lr=lr,
        stride=stride,
        merge_weight=merge_weight,
        seed=seed,
        extra_top_k=tuple(extra_top_k),
        validation=validation,
        patience=patience,
        weight_decay=weight_decay,
        tie=tie,
        optimizer=optimizer,
    )
    if kl_tokens < 0:
        raise ValueError("--kl-tokens must be >= 0")
    if validation and validation >= sequences and evaluate_file is None:
        raise ValueError(f"--validation {validation} needs --sequences > {validation}")
    if evaluate_file is None and out is None:
        raise ValueError("give --out FILE for the fitted maps (or --evaluate FILE to measure one)")
    if tokens < min_tokens(opts):
        raise ValueError(
            f"--tokens {tokens} is too short for n_sink {n_sink} + n_tail {n_tail} + top_k {top_k}: "
            f"it needs at least {min_tokens(opts)}"
        )
    if evaluate_file is None or per_prompt is not None:
        require_torch()
    split = "held-out" if evaluate_file else "calibration"
    texts = calibration_texts(tuple(data), builtin, split)
    with err.status(f"loading {model}"):
        net, tokenizer, runtime = load_model(model, backend)
    from topkphi.calibration.data import token_sequences

    seqs = token_sequences(tokenizer, texts, tokens, sequences)
    if evaluate_file is not None:
        return _evaluate(
            err, net, tokenizer, runtime, seqs, model, evaluate_file, opts, n_queries, per_prompt, json_out,
            kl_tokens=kl_tokens, per_prompt_queries=per_prompt_queries,
        )
    _fit(err, net, runtime, seqs, model, opts, out, list(texts)[: len(seqs)])


def _progress(err):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _fit(err, net, runtime, seqs, model_id, opts, out, sources) -> None:
    from topkphi.calibration.fit import fit_model
    from topkphi.calibration.phi_file import PhiMeta, save_phi

    start = time.perf_counter()
    with err.status(f"capturing q/k/v on {len(seqs)} x {len(seqs[0])} tokens"):
        captured = [capture_ids(net, ids, runtime.framework) for ids in seqs]
    fp = fingerprint(net, model_id, runtime.framework)
    n_layers = len(captured[0])
    tasks = {}
    with _progress(err) as progress:

        def start_layer(layer):
            tasks[layer] = progress.add_task(f"layer {layer + 1:>2}/{n_layers}", total=opts.steps, loss="")

        def step(layer, i, loss):
            if i == 1 or i % 5 == 0 or i == opts.steps:
                progress.update(tasks[layer], completed=i, loss=f"loss {loss:.4f}")

        def done(fit):
            progress.update(
                tasks[fit.layer], completed=opts.steps, loss=f"loss {fit.loss_before:.3f} -> {fit.loss_after:.4f}"
            )

        fits = fit_model(captured, opts, on_layer_start=start_layer, on_step=step, on_layer_done=done)
    d = captured[0][0].k.shape[-1]
    meta = PhiMeta(
        model_id=model_id,
        config_hash=fp.config_hash,
        weights_hash=fp.weights_hash,
        n_layers=n_layers,
        n_kv_heads=captured[0][0].k.shape[1],
        d=d,
        m=opts.n_features,
        scale=captured[0][0].scale,
        n_sink=opts.n_sink,
        n_tail=opts.n_tail,
        top_k=opts.top_k,
        extra={
            "tokens": len(seqs[0]),
            "sequences": len(seqs),
            "sources": sources,
            "steps": opts.steps,
            "lr": opts.lr,
            "stride": opts.stride,
            "merge_weight": opts.merge_weight,
            "extra_top_k": list(opts.extra_top_k),
            "validation": opts.validation,
            "weight_decay": opts.weight_decay,
            "tie": opts.tie,
            "optimizer": opts.optimizer,
            "val_after": [f.val_after for f in fits],
            "best_step": [f.best_step for f in fits],
            "loss_before": [f.loss_before for f in fits],
            "loss_after": [f.loss_after for f in fits],
        },
    )
    save_phi(out, [f.fmap for f in fits], meta)
    before = np.mean([f.loss_before for f in fits])
    after = np.mean([f.loss_after for f in fits])
    click.echo(
        f"wrote {out}: {n_layers} layers x {meta.n_kv_heads} KV heads, m={opts.n_features}; "
        f"mean loss {before:.3f} -> {after:.4f} in {time.perf_counter() - start:.0f} s"
    )


def _prompt_prefix(layers, end: int, n_last: int | None):
    """The prompt's captures (everything before ``end``), optionally with only its last ``n_last`` queries:
    the queries nearest the decode steps have mids most like theirs, and a fit on fewer is faster."""
    from topkphi.calibration.fit import truncate
    from topkphi.capture import LayerCapture

    prefix = [truncate(c, end) for c in layers]
    if n_last is None:
        return prefix
    return [LayerCapture(c.q[:, :, -n_last:], c.k, c.v, c.scale) for c in prefix]


def next_token_kl(net, tokenizer, runtime, ids: list[int], n_tokens: int, cfg, maps_by_method: dict) -> dict:
    """``{method: (mean KL, max KL)}``: KL(dense || method) of the next-token distribution at the last
    ``n_tokens`` positions, teacher-forced after one dense prefill (as ``topkphi eval``'s KL task does).

    ``maps_by_method``: ``{name: per-layer maps or None}``; None runs Top-K only at the budget matched
    to the first entry that has maps (SPEC section 6)."""
    import topkphi
    from topkphi.evaluation import scoring
    from topkphi.evaluation.harness import make_runner, policy

    runner = make_runner(runtime.framework, net, tokenizer, topkphi.get_backend(runtime.kernel_backend))
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


def _evaluate(
    err,
    net,
    tokenizer,
    runtime,
    seqs,
    model_id,
    phi_file,
    opts,
    n_queries,
    per_prompt,
    json_out,
    kl_tokens: int = 0,
    per_prompt_queries: int | None = None,
) -> None:
    import topkphi
    from topkphi.calibration.fit import fit_model, replay_errors

    maps = load_layer_maps(phi_file, net, model_id, runtime.framework)
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
            layers = capture_ids(net, ids, runtime.framework)
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
                fits = fit_model([prefill], opts, maps, time_budget_s=per_prompt)
            row["per_prompt_seconds"] = time.perf_counter() - start
            row["per_prompt_steps"] = int(np.mean([f.steps for f in fits]))
            prompt_maps = [f.fmap for f in fits]
            e_pp = replay_errors(layers, positions, opts.n_sink, opts.n_tail, opts.top_k, prompt_maps)
            row["err_phi_prompt"] = float(e_pp.mean())
            row["per_layer_phi_prompt"] = e_pp.mean((1, 2)).tolist()
        if kl_tokens:
            with err.status(f"decoding the last {kl_tokens} tokens for KL"):
                methods = {"top_k_matched": None, "phi": maps}
                if prompt_maps is not None:
                    methods["phi_prompt"] = prompt_maps
                kl = next_token_kl(net, tokenizer, runtime, ids, kl_tokens, cfg.replace(feature_map=None), methods)
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
