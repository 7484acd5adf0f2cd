"""`topkphi inspect-heads`: per layer and head, how diffuse attention is and whether phi pays off."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import click

from topkphi.commands.errors import user_errors
from topkphi.commands.options import (
    backend_option,
    budget_options,
    check_phi_options,
    config_from_options,
    estimator_options,
    mass_options,
    model_option,
    output_path,
    require_module,
    seed_option,
)
from topkphi.commands.runtime import check_phi_model, read_phi_file, resolve_runtime
from topkphi.config import per_layer_config

MIN_MID = 4  # mid tokens the earliest inspected step needs for there to be anything to inspect


def read_prompt(prompt_file: str | None, text: str | None) -> str:
    if (prompt_file is None) == (text is None):
        raise ValueError("give exactly one of --prompt-file or --text")
    if text is not None:
        return text
    if prompt_file == "-":
        return sys.stdin.read()
    path = Path(prompt_file)
    if not path.is_file():
        raise ValueError(f"no such prompt file: {prompt_file}")
    return path.read_text(encoding="utf-8", errors="replace")


def check_length(n_tokens: int, n_sink: int, n_tail: int, n_queries: int) -> None:
    """The earliest inspected step must have a mid region; a budget that covers it is fine (exact attention)."""
    needed = n_sink + n_tail + MIN_MID + n_queries - 1
    if n_tokens < needed:
        raise ValueError(
            f"the prompt has {n_tokens} tokens: with --n-sink {n_sink}, --n-tail {n_tail} and --n-queries "
            f"{n_queries} nothing is left to inspect; it needs at least {needed} (a longer prompt or smaller --n-tail)"
        )


def capture_prompt(runtime, net, tokenizer, text: str, n_sink: int, n_tail: int, n_queries: int,
                   n_rows: int | None = None):
    """``(layers, n_tokens)``: every attention layer's q/k/v on the prompt (the last ``n_rows`` queries,
    default ``n_queries``; fitted summaries fit from rows before the inspected ones)."""
    from topkphi.models.tokenize import encode_long

    ids = encode_long(tokenizer, text)
    check_length(len(ids), n_sink, n_tail, n_queries)
    return runtime.capture(net, ids, n_rows or n_queries), len(ids)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(console, rows, summary: dict, title: str, max_rows: int) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  show_edge=False)
    for column in ("L:q/kv", "H/logN", "dropped", "rho", "mid err", "err K", "err phi", "gain", "top_k*", "chosen",
                   "drop^/cert"):
        table.add_column(column, justify="right", no_wrap=True)
    ordered = sorted(rows, key=lambda r: -r.entropy)
    shown = ordered if max_rows <= 0 else ordered[:max_rows]
    for r in shown:
        style = "green" if r.phi_gain > 0 else "red" if r.phi_gain < 0 else "dim"
        table.add_row(f"{r.layer}:{r.q_head}/{r.kv_head}", f"{r.entropy:.3f}", f"{r.dropped_mass:.3f}",
                      f"{r.rho:.3f}", _fmt(r.mid_mass_error, ".2f"), f"{r.err_top_k:.1e}", f"{r.err_phi:.1e}",
                      f"[{style}]{r.phi_gain:+.2f}[/]", f"{r.suggested_top_k}/{r.suggested_top_k_kv}",
                      f"{r.chosen_top_k_kv:.0f}", f"{_fmt(r.delta_hat)}/{_fmt(r.delta_bar)}")
    if len(shown) < len(rows):
        table.caption = f"{len(rows) - len(shown)} lower-entropy heads not shown (--rows 0 shows all; --json/--csv)"
    console.print(table)
    s = summary
    console.print(
        "[dim]L:q/kv: layer, query head / KV head; dropped: dense mass outside sink + tail + Top-K; "
        "rho: phi's estimate of it; mid err: |estimated / "
        "true unretrieved mass - 1|; err: rel. output error vs dense (K: Top-K only at matched reads); gain: "
        "(err K - err phi) / max; top_k*: budget keeping dropped <= the limit (query head / its KV head); "
        "chosen: mid tokens the policy read for the KV head; drop^/cert: its estimated / certified dropped mass "
        "(--budget mass/marginal, --certify)[/]"
    )
    console.print(
        f"{s['n_heads']} heads; {s['share_high_entropy']:.0%} have H/logN > {s['high_entropy_threshold']}. "
        f"phi helps in [green]{s['phi_helps']}[/], hurts in [red]{s['phi_hurts']}[/], "
        f"neutral in {s['phi_neutral']}. Mean gain: high-entropy heads {_fmt(s['mean_gain_high_entropy'], '+.2f')}, "
        f"low-entropy {_fmt(s['mean_gain_low_entropy'], '+.2f')}; corr(entropy, gain) = "
        f"{_fmt(s['entropy_gain_correlation'], '+.2f')}.\n"
        f"Mean rel. error vs dense: Top-K only {s['mean_err_top_k']:.2e}, Top-K + phi {s['mean_err_phi']:.2e}. "
        f"Largest per-KV-head budget for the dropped-mass limit: top_k = {s['max_suggested_top_k']}; mean "
        f"suggested {s['mean_suggested_top_k_kv']:.0f} vs chosen by the policy {s['mean_chosen_top_k_kv']:.0f} "
        f"({s['share_chosen_below_suggested']:.0%} of heads read fewer than suggested)."
    )


def _clean(x):
    """NaN/Inf become null, so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


@click.command("inspect-heads")
@model_option
@click.option("--prompt-file", default=None, help="Text file to run ('-' reads stdin).")
@click.option("--text", default=None, help="The prompt itself.")
@backend_option
@budget_options
@mass_options(dropped_mass=False)
@estimator_options(dense=False)
@seed_option
@click.option("--n-queries", type=int, default=8, show_default=True,
              help="Decode steps inspected: the last positions of the prompt.")
@click.option("--max-dropped-mass", type=float, default=0.05, show_default=True,
              help="Dense mass a head may lose: sets the suggested per-head top_k, and with --budget mass the "
              "policy's target.")
@click.option("--rows", "max_rows", type=int, default=40, show_default=True,
              help="Heads shown in the table, highest entropy first (0: all).")
@click.option("--json", "json_out", default=None, help="Write the full report as JSON here ('-': stdout, no table).")
@click.option("--csv", "csv_out", default=None, help="Write one row per head as CSV here.")
@click.option("--plot", "plot_out", default=None,
              help="Write PNG heatmaps (layers x heads) of entropy and phi gain (needs matplotlib: [plot]).")
@user_errors
def inspect_heads(model, prompt_file, text, backend, n_sink, n_tail, top_k, selection, page_size, budget, min_top_k,
                  certify, feature_map,
                  n_features, n_clusters, fit_window, phi_file, seed, n_queries, max_dropped_mass, max_rows,
                  json_out, csv_out, plot_out) -> None:
    """Per layer and head: attention entropy, mass kept by sink + tail + Top-K, and Top-K only vs Top-K + phi."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import topkphi
    from topkphi.analysis.heads import inspect_layer, summarize

    if n_queries < 1:
        raise ValueError("--n-queries must be >= 1")
    if not 0.0 <= max_dropped_mass < 1.0:
        raise ValueError("--max-dropped-mass must be in [0, 1)")
    check_phi_options(feature_map, phi_file)
    if feature_map == "none":
        raise click.UsageError("--feature-map none leaves nothing to compare with Top-K only: pick an estimator")
    mass = {"max_dropped_mass": max_dropped_mass} if budget == "mass" else {}  # else only the suggestion's
    cfg = config_from_options(top_k, n_sink, n_tail, selection, page_size, feature_map, n_features, seed,
                              n_clusters=n_clusters, fit_window=fit_window, budget=budget, min_top_k=min_top_k,
                              certify=certify, **mass)
    if cfg.feature_map is None and feature_map != "learned":
        raise click.UsageError(f"--selection {selection} has no default estimator "
                               f"(nothing would be compared with Top-K only): name one with --feature-map")
    prompt = read_prompt(prompt_file, text)
    # every option is checked before the model loads and the analysis runs (minutes on a long prompt)
    json_path = output_path(json_out, "--json")
    csv_path = output_path(csv_out, "--csv")
    plot_path = output_path(plot_out, "--plot", ".png")
    if plot_path is not None:
        require_module("matplotlib", "--plot", "plot")
    maps = meta = None
    if phi_file is not None:
        maps, meta = read_phi_file(phi_file)
    err = Console(stderr=True, highlight=False)
    runtime = resolve_runtime(backend)
    with err.status(f"running {model} on the prompt"):
        net, tokenizer = runtime.load(model)
        layers, n_tokens = capture_prompt(runtime, net, tokenizer, prompt, n_sink, n_tail, n_queries,
                                          n_queries + (cfg.fit_window if cfg.fitted else 0))
    layer_cfg = lambda i: cfg  # noqa: E731
    if maps is not None:
        check_phi_model(phi_file, meta, runtime, net, model, cfg, lambda note: err.print(note, style="dim",
                                                                                          markup=False))
        layer_cfg = per_layer_config(cfg, maps)
    if n_tokens - n_queries + 1 <= n_sink + n_tail + top_k:
        err.print(f"note: at the inspected steps the prompt ({n_tokens} tokens) fits in sink + tail + top-k "
                  f"({n_sink + n_tail + top_k}): Top-K takes the whole mid, so both methods are exact attention",
                  style="dim", markup=False, soft_wrap=True)
    positions = list(range(n_tokens - n_queries, n_tokens))
    rows = []
    columns = (TextColumn("[dim]layers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        for layer, capture in enumerate(progress.track(layers, description="layers")):
            rows.extend(inspect_layer(capture, layer, positions, layer_cfg(layer), max_dropped_mass))
    summary = summarize(rows)
    d, dv = layers[0].k.shape[-1], layers[0].v.shape[-1]
    report = {
        "model": model,
        "runtime": {"framework": runtime.framework, "device": runtime.device},
        "n_tokens": n_tokens,
        "positions": positions,
        "config": {"n_sink": n_sink, "n_tail": n_tail, "top_k": top_k,
                   "top_k_matched": topkphi.matched_top_k(layer_cfg(0), d, dv), "selection": selection,
                   "page_size": page_size, "feature_map": feature_map, "n_features": layer_cfg(0).n_features,
                   "seed": seed, "phi_file": phi_file, "budget": budget, "min_top_k": min_top_k,
                   "certify": certify},
        "max_dropped_mass": max_dropped_mass,
        "summary": summary,
        "heads": [r.as_dict() for r in rows],
    }
    report = _clean(report)
    if json_out == "-":
        click.echo(json.dumps(report, indent=2))
    else:
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        title = (f"{model} on {runtime.device}: N={n_tokens}, last {n_queries} positions; sink {n_sink} + tail "
                 f"{n_tail} + top-k {top_k} ({selection}) + {feature_map} vs top-k "
                 f"{report['config']['top_k_matched']}; dropped-mass limit {max_dropped_mass}")
        print_table(Console(highlight=False), rows, summary, title, max_rows)
    if csv_path is not None:
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(report["heads"][0]))
            writer.writeheader()
            writer.writerows(report["heads"])
    if plot_path is not None:
        from topkphi.analysis.plots import plot_heads

        plot_heads(rows, plot_path, title=f"{model}: N={n_tokens}, top-k {top_k}, {feature_map}")
