"""`topkphi calibrate`: fit learned feature maps on calibration text, save them, and measure them.

    topkphi calibrate --model smollm2-135m --builtin --out phi.safetensors
    topkphi calibrate --model smollm2-135m --evaluate phi.safetensors --tokens 2048 --top-k 64

The budgets (``--n-sink``, ``--n-tail``, ``--top-k``) default to ``topkphi.Config()``'s, so a file fitted
with the defaults matches the other commands' defaults; ``--evaluate`` is in ``calibrate_evaluate``.
"""

from __future__ import annotations

import time

import click
import numpy as np

from topkphi.calibration.prompt import LEARNED_FEATURES
from topkphi.commands.errors import user_errors
from topkphi.commands.options import DEFAULTS, backend_option, model_option, output_path
from topkphi.commands.runtime import check_phi_model, read_phi_file, resolve_runtime


def load_model(model: str, backend: str):
    """``(net, tokenizer, runtime)`` for a ``--model`` spec and a ``--backend`` name."""
    runtime = resolve_runtime(backend)
    net, tokenizer = runtime.load(model)
    return net, tokenizer, runtime


def calibration_texts(data: tuple[str, ...], builtin: bool, split: str) -> dict[str, str]:
    from topkphi.calibration import data as cal_data

    if data and builtin:
        raise ValueError("give --data FILE ... or --builtin, not both")
    if data:
        return cal_data.read_files(data)
    return cal_data.builtin_texts(split)


class _LongText:
    """The model's tokenizer, encoding without transformers' too-long warning (the text is cut into windows)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        from topkphi.models.tokenize import encode_long

        return encode_long(self.tokenizer, text)


@click.command()
@model_option
@backend_option(help="Runtime that runs the model for the capture (the fit itself runs in torch, on the CPU or "
                "next to a CUDA model); names as in `topkphi backends`.")
@click.option("--data", multiple=True, type=click.Path(), help="Calibration text file(s); repeatable.")
@click.option("--builtin", is_flag=True, help="Built-in Gutenberg plays (default when no --data is given).")
@click.option("--n-features", type=int, default=LEARNED_FEATURES, show_default=True, help="Feature-map size m.")
@click.option("--n-sink", type=int, default=DEFAULTS.n_sink, show_default=True)
@click.option("--n-tail", type=int, default=DEFAULTS.n_tail, show_default=True)
@click.option("--top-k", type=int, default=DEFAULTS.top_k, show_default=True,
              help="The budget the maps are fitted for.")
@click.option("--tokens", type=int, default=2048, show_default=True, help="Tokens per calibration sequence.")
@click.option("--sequences", type=int, default=1, show_default=True, help="Calibration sequences (one per text).")
@click.option("--steps", type=int, default=300, show_default=True, help="Adam steps per layer.")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--stride", type=int, default=8, show_default=True, help="One calibration query every STRIDE positions.")
@click.option("--merge-weight", type=float, default=10.0, show_default=True,
              help="Weight of the merged output's error vs dense, next to the log-mass and value terms.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--extra-top-k", type=int, multiple=True,
              help="Also fit for this budget (repeatable): one map for several top_k instead of one per budget.")
@click.option("--validation", type=int, default=0, show_default=True,
              help="Hold out the last V calibration sequences and keep the iterate with the best loss on them "
              "(early stopping); needs --sequences > V.")
@click.option("--patience", type=int, default=0, show_default=True, help="With --validation: stop after this many "
              "validation scores (every 5 steps) without improvement; 0 runs all --steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True,
              help="Pull the parameters toward the initial (or warm-start) map.")
@click.option("--tie", is_flag=True, help="W_k = W_q (shared directions, separate biases): half the parameters.")
@click.option("--optimizer", type=click.Choice(["adam", "lbfgs"]), default="adam", show_default=True)
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="Where to write the phi file (required, unless --evaluate).")
@click.option("--evaluate", "evaluate_file", default=None, type=click.Path(dir_okay=False),
              help="Instead of fitting: measure this phi file on held-out text (built-in held-out plays "
              "unless --data is given) against Top-K only at matched reads.")
@click.option("--n-queries", type=int, default=8, show_default=True,
              help="--evaluate: decode steps replayed per text (the last positions).")
@click.option("--per-prompt", type=float, default=None,
              help="--evaluate: also refine the maps on each text's own prefill for this many seconds.")
@click.option("--per-prompt-queries", type=int, default=None,
              help="--per-prompt: fit on the prompt's last Q queries only (default: all of them).")
@click.option("--kl-tokens", type=int, default=0, show_default=True,
              help="--evaluate: also decode the last T tokens of each text with the model (dense prefill before "
              "them) and report KL(dense || method) of the next-token distribution.")
@click.option("--json", "json_out", default=None, help="--evaluate: write the numbers as JSON here.")
@user_errors
def calibrate(model, backend, data, builtin, n_features, n_sink, n_tail, top_k, tokens, sequences, steps, lr, stride,
              merge_weight, seed, extra_top_k, validation, patience, weight_decay, tie, optimizer, out, evaluate_file,
              n_queries, per_prompt, per_prompt_queries, kl_tokens, json_out) -> None:
    """Fit learned feature maps per (layer, KV head) on calibration text and save them (safetensors)."""
    from rich.console import Console

    from topkphi.calibration.fit import FitOptions, min_tokens, require_torch

    err = Console(stderr=True, highlight=False)
    if tokens < 1 or sequences < 1 or n_queries < 1:
        raise ValueError("--tokens, --sequences and --n-queries must be >= 1")
    opts = FitOptions(n_features=n_features, n_sink=n_sink, n_tail=n_tail, top_k=top_k, steps=steps, lr=lr,
                      stride=stride, merge_weight=merge_weight, seed=seed, extra_top_k=tuple(extra_top_k),
                      validation=validation, patience=patience, weight_decay=weight_decay, tie=tie,
                      optimizer=optimizer)
    if kl_tokens < 0:
        raise ValueError("--kl-tokens must be >= 0")
    if per_prompt is not None and not per_prompt > 0:
        raise ValueError(f"--per-prompt must be > 0 seconds, got {per_prompt}")
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
    # checked before the model loads and the fit runs: a bad path must not cost the fit
    out_path = output_path(out, "--out") if evaluate_file is None else None
    json_path = output_path(json_out, "--json")
    maps = meta = None
    if evaluate_file is not None:
        maps, meta = read_phi_file(evaluate_file)
    split = "held-out" if evaluate_file else "calibration"
    texts = calibration_texts(tuple(data), builtin, split)
    runtime = resolve_runtime(backend)
    with err.status(f"loading {model}"):
        net, tokenizer = runtime.load(model)
    from topkphi.calibration.data import token_sequences

    seqs = token_sequences(_LongText(tokenizer), texts, tokens, sequences)
    if evaluate_file is not None:
        from topkphi.commands.calibrate_evaluate import evaluate_file as evaluate

        check_phi_model(evaluate_file, meta, runtime, net, model)
        return evaluate(err, runtime, net, tokenizer, seqs, model, evaluate_file, maps, opts, n_queries, per_prompt,
                        json_path, kl_tokens=kl_tokens, per_prompt_queries=per_prompt_queries)
    _fit(err, net, runtime, seqs, model, opts, out_path, list(texts)[: len(seqs)])


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
        captured = [runtime.capture(net, ids) for ids in seqs]
    fp = runtime.fingerprint(net, model_id)
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
