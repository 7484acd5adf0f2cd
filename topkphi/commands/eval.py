"""`topkphi eval`: task accuracy, next-token KL and attention-output error at matched KV reads."""

from __future__ import annotations

import json
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
from topkphi.evaluation.plot import map_name


def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"{option} needs at least one value")
    return list(dict.fromkeys(names))


def _ints(value: str, option: str) -> list[int]:
    out = []
    for v in _names(value, option):
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"{option} takes integers, got {v!r}") from None
    return out


def budget_note(phi_file: str, meta, base, budgets: list[int]) -> str | None:
    """A note when the phi file was fitted for other budgets than the run's."""
    if (meta.n_sink, meta.n_tail) == (base.n_sink, base.n_tail) and meta.top_k in budgets:
        return None
    return (f"note: {Path(phi_file).name} was fitted for n_sink/n_tail/top_k {(meta.n_sink, meta.n_tail, meta.top_k)}, "
            f"running with n_sink/n_tail {(base.n_sink, base.n_tail)} and budgets {budgets}")


def render(console, report: dict) -> None:
    from rich.table import Table

    results = report["results"]
    tasks = report["tasks"]
    for context in report["contexts"]:
        table = Table(title=f"{report['model']} @ {context} tokens, {map_name(report)}: accuracy % (RULER string "
                            "match), KL, attn error", title_justify="left")
        table.add_column("method")
        table.add_column("B", justify="right")
        table.add_column("K / tail", justify="right")
        table.add_column("KV read", justify="right")
        for task in tasks:
            if task == "kl":
                table.add_column("KL", justify="right")
                table.add_column("ppl", justify="right")
            elif task == "attn":
                table.add_column("attn err", justify="right")
            else:
                table.add_column(task, justify="right")
        keys = list(dict.fromkeys((r["method"], r["budget"]) for r in results if r["context"] == context))
        for method, budget in keys:
            mine = {r["task"]: r for r in results
                    if r["context"] == context and r["method"] == method and r["budget"] == budget}
            reads = [r["read_fraction"] for r in mine.values()]
            first = next(iter(mine.values()))
            knob = "-" if first["n_tail"] is None else (
                f"tail {first['n_tail']}" if method == "sink-tail" else f"K {first['top_k']}")
            cells = [method, "-" if budget is None else str(budget), knob, f"{sum(reads) / len(reads):.1%}"]
            for task in tasks:
                r = mine.get(task)
                if task == "kl":
                    cells += ([f"{r['kl']:.4f}", f"{r['ppl']:.2f}"] if r else ["", ""])
                elif task == "attn":
                    cells.append(f"{r['attn_err']:.3f}" if r else "")
                else:
                    cells.append(f"{r['score']:.1f}" if r else "")
            table.add_row(*cells)
        console.print(table)
        attn = [r for r in results if r["context"] == context and r["task"] == "attn" and r["method"] != "dense"]
        if attn:
            t = Table(title=f"attn error by entropy tercile @ {context}", title_justify="left")
            for name in ("method", "B", "low H", "mid H", "high H", "all"):
                t.add_column(name, justify="left" if name == "method" else "right")
            for r in attn:
                cells = [f"{r['terciles'][k]:.3f}" if r["terciles"][k] is not None else "-"
                         for k in ("low", "mid", "high")]
                t.add_row(r["method"], str(r["budget"]), *cells, f"{r['attn_err']:.3f}")
            console.print(t)



@click.command("eval")
@model_option
@click.option("--methods", default="dense,sink-tail,topk,topk+phi", show_default=True,
              help="Comma-separated: dense, sink-tail, topk, topk+phi (dense is always run).")
@click.option("--budgets", default="64,256", show_default=True,
              help="Top-K of topk+phi (the cap with --budget mass); the other methods get the same "
              "token-equivalent reads.")
@click.option("--tasks", default="niah_single,niah_essay,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,kl,attn",
              show_default=True, help="Comma-separated task names.")
@click.option("--context", "contexts", default="2048", show_default=True, help="Comma-separated lengths in tokens.")
@click.option("--samples", type=int, default=5, show_default=True, help="Samples per task and context.")
@seed_option
@backend_option
@budget_options(top_k=False)
@mass_options
@estimator_options(dense=False)
@click.option("--kl-tokens", type=int, default=32, show_default=True, help="Teacher-forced decode steps per KL window.")
@click.option("--attn-positions", type=int, default=2, show_default=True,
              help="Decode steps per window for the per-head attention-output error.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of accuracy and KL against the KV read (needs matplotlib: the [eval] extra).")
@user_errors
def eval_command(model, methods, budgets, tasks, contexts, samples, seed, backend, n_sink, n_tail, selection,
                 page_size, budget, max_dropped_mass, min_top_k, certify, feature_map, n_features, n_clusters,
                 fit_window, phi_file, kl_tokens, attn_positions,
                 json_out, plot_out) -> None:
    """Accuracy on RULER-style tasks, KL and attention error of each method at matched KV reads."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from topkphi.evaluation.harness import EvalSpec, evaluate, n_units

    check_phi_options(feature_map, phi_file)
    if feature_map == "none":
        raise click.UsageError("--feature-map none would make topk+phi Top-K only: the topk method is that already")
    budget_list = _ints(budgets, "--budgets")
    # the budgets are topk+phi's top_k: the first stands in for validation, each policy sets its own
    base = config_from_options(max(1, min(budget_list)), n_sink, n_tail, selection, page_size, feature_map,
                               n_features, seed, n_clusters=n_clusters, fit_window=fit_window, budget=budget,
                               max_dropped_mass=max_dropped_mass, min_top_k=min_top_k, certify=certify)
    if base.feature_map is None and feature_map != "learned":
        raise click.UsageError(f"--selection {selection} has no default estimator "
                               f"(topk+phi would be Top-K only): name one with --feature-map")
    spec = EvalSpec(methods=_names(methods, "--methods"), budgets=budget_list, tasks=_names(tasks, "--tasks"),
                    contexts=_ints(contexts, "--context"), samples=samples, seed=seed, base=base,
                    kl_tokens=kl_tokens, attn_positions=attn_positions)
    spec.validate()
    covered = spec.covered()
    if len(covered) == len(spec.contexts) * len(spec.budgets):  # a run that compares nothing
        floor = n_sink + n_tail + min(spec.budgets)
        raise click.UsageError(f"every budget covers the whole mid at every --context (sink {n_sink} + tail {n_tail} + "
                               f"top-k {min(spec.budgets)} >= {max(spec.contexts)}): every method would read the "
                               f"whole cache; use --context > {floor} or smaller --budgets")
    json_path = output_path(json_out, "--json")
    plot_path = output_path(plot_out, "--plot", ".png")
    if plot_path is not None:
        require_module("matplotlib", "--plot", "eval")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # logs keep whole tables
    err = Console(stderr=True, highlight=False)

    def note(text: str) -> None:
        err.print(text, style="dim", markup=False, soft_wrap=True)

    for context, budget in covered:
        note(f"note: at --context {context}, budget {budget} covers the whole mid: every method reads it all there "
             "(exact attention)")
    maps = meta = None
    if phi_file is not None:
        maps, meta = read_phi_file(phi_file)  # before the model loads: a bad file costs nothing
    runtime = resolve_runtime(backend)
    net, tokenizer = runtime.load(model)
    runner = runtime.runner(net, tokenizer)
    if maps is not None:
        check_phi_model(phi_file, meta, runtime, net, model)
        extra = budget_note(phi_file, meta, base, spec.budgets)
        if extra:
            note(extra)
        spec.maps = maps
        spec.validate()
        n_features = maps[0].n_features
    note(f"{model} on {runtime.device} ({runtime.kernel_backend})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        job = bar.add_task("eval", total=n_units(spec))
        out = evaluate(runner, spec, lambda n, desc: bar.update(job, advance=n, description=desc))
    report = {
        "model": model,
        "runtime": {"framework": runtime.framework, "device": runtime.device, "kernel_backend": runtime.kernel_backend},
        "methods": spec.methods, "budgets": spec.budgets, "tasks": spec.tasks, "contexts": spec.contexts,
        "samples": samples, "seed": seed, "kl_tokens": kl_tokens, "attn_positions": attn_positions,
        "config": {"n_sink": n_sink, "n_tail": n_tail, "selection": selection, "page_size": page_size,
                   "feature_map": feature_map, "n_features": n_features, "phi_file": phi_file, "budget": budget,
                   "max_dropped_mass": max_dropped_mass, "min_top_k": min_top_k, "certify": certify},
        "results": out["results"], "rows": out["rows"],
    }
    render(console, report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
        note(f"wrote {json_path}")
    if plot_path is not None:
        from topkphi.evaluation.plot import plot

        plot(report, plot_path)
        note(f"wrote {plot_path}")
