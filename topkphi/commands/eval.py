"""`topkphi eval`: task accuracy, next-token KL and attention-output error at matched KV reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from topkphi.commands.calibrate import check_phi_options, phi_file_option
from topkphi.commands.errors import user_errors
from topkphi.commands.runtime import RUNTIMES, resolve_runtime

NUMERIC = {"kl", "attn"}


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


def load_runner(model: str, backend: str):
    import topkphi
    from topkphi.evaluation.harness import make_runner

    runtime = resolve_runtime(backend)
    kernel = topkphi.get_backend(runtime.kernel_backend)
    if runtime.framework == "torch":
        from topkphi.models import resolve

        net, tokenizer = resolve.load_torch_model(model, device=runtime.device)
    else:
        from topkphi.models import resolve

        net, tokenizer = resolve.load_mlx_model(model)
    return make_runner(runtime.framework, net, tokenizer, kernel), runtime


def load_maps(phi_file: str, runner, model: str, framework: str, base, budgets: list[int], warn) -> list:
    """The phi file's per-layer learned maps, checked against the loaded model (ValueError: one line)."""
    from topkphi.calibration.phi_file import load_phi
    from topkphi.commands.calibrate import fingerprint

    maps, meta = load_phi(phi_file, fingerprint(runner.model, model, framework))
    if (meta.n_sink, meta.n_tail) != (base.n_sink, base.n_tail) or meta.top_k not in budgets:
        fitted = (meta.n_sink, meta.n_tail, meta.top_k)
        warn(f"note: {Path(phi_file).name} was fitted for n_sink/n_tail/top_k {fitted}, "
             f"running with n_sink/n_tail {(base.n_sink, base.n_tail)} and budgets {budgets}")
    return maps


def render(console, report: dict) -> None:
    from rich.table import Table

    results = report["results"]
    tasks = report["tasks"]
    for context in report["contexts"]:
        table = Table(title=f"{report['model']} @ {context} tokens, {_map_name(report)}: accuracy % (RULER string "
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


def _map_name(report: dict) -> str:
    cfg = report["config"]
    name = f"{cfg['feature_map']} phi (m = {cfg['n_features']})"
    return f"{name}, {Path(cfg['phi_file']).name}" if cfg.get("phi_file") else name


STYLE = {"dense": ("tab:blue", "*", 13), "sink-tail": ("tab:orange", "s", 8), "topk": ("tab:green", "o", 8),
         "topk+phi": ("tab:red", "^", 8)}
GOAL_READ = 0.05  # the product goal: within 2 points of dense at <= 5% of the KV read per step
DODGE = 0.035  # methods at one budget read the same; each is drawn shifted by this much (log x) to stay visible


def plot(report: dict, path: Path) -> None:
    """Accuracy and KL against the fraction of the KV cache read: one colour and marker per method, one line
    style per context; methods at one budget sit at (nearly) the same x, so they are dodged a little."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullFormatter, PercentFormatter

    results = report["results"]
    qa = [t for t in report["tasks"] if t not in NUMERIC]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = [(axes[0], f"accuracy, mean over {len(qa)} question tasks (%)", qa, "score"),
              (axes[1], "next-token KL(dense || method), nats", ["kl"], "kl")]
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["-", "--", ":", "-."]
    xs_all = []
    for ax, ylabel, tasks, key in panels:
        for ci, context in enumerate(report["contexts"]):
            for mi, method in enumerate(methods):
                points = []
                for budget in dict.fromkeys(r["budget"] for r in results if r["method"] == method):
                    rows = [r for r in results if r["context"] == context and r["method"] == method
                            and r["budget"] == budget and r["task"] in tasks]
                    if rows:
                        points.append((sum(r["read_fraction"] for r in rows) / len(rows),
                                       sum(r[key] for r in rows) / len(rows)))
                if not points:
                    continue
                points.sort()
                xs_all += [x for x, _ in points]
                shift = 1.0 if method == "dense" else (1 + DODGE) ** (mi - (len(methods) - 1) / 2)
                color, marker, size = STYLE.get(method, (None, "D", 8))
                ax.plot([x * shift for x, _ in points], [y for _, y in points], color=color, marker=marker,
                        markersize=size, markerfacecolor="none" if method == "topk+phi" else color,
                        markeredgewidth=1.6, linestyle=lines[ci % len(lines)] if len(points) > 1 else "none")
        ax.set_xscale("log")
        ax.axvline(GOAL_READ, color="0.4", linestyle=":", linewidth=1)
        ax.text(GOAL_READ, 0.5, "goal: <= 5% read ", transform=ax.get_xaxis_transform(), rotation=90, ha="right",
                va="center", fontsize=8, color="0.3")
        ax.set_xlabel("fraction of the KV cache read per decode step (token-equivalents)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    low = min([GOAL_READ, *xs_all]) * 0.8
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if t >= low]
    for ax in axes:
        ax.set_xlim(low, 1.25)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylim(-5, 105)
    top = axes[1].get_ylim()[1]
    axes[1].set_ylim(-0.04 * top, top)  # dense's KL is 0: keep its marker whole
    handles = [Line2D([], [], color=STYLE.get(m, (None,))[0], marker=STYLE.get(m, (None, "D"))[1], linestyle="none",
                      markersize=8, markerfacecolor="none" if m == "topk+phi" else STYLE.get(m, (None,))[0],
                      markeredgewidth=1.6, label=m) for m in methods]
    if len(report["contexts"]) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=lines[ci % len(lines)], label=f"{context} tokens")
                    for ci, context in enumerate(report["contexts"])]
    budgets = ", ".join(str(b) for b in report["budgets"])
    contexts = ", ".join(str(c) for c in report["contexts"])
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(f"{report['model']} @ {contexts} tokens, samples per task {report['samples']}: matched reads at "
                 f"budgets {budgets}\n({report['config']['selection']} selection, {_map_name(report)}; "
                 "methods at one budget read the same and are drawn slightly apart)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("eval")
@click.option("--model", "-m", default="smollm2-135m", show_default=True,
              help="Alias, local HF folder, .gguf file or hub id.")
@click.option("--methods", default="dense,sink-tail,topk,topk+phi", show_default=True,
              help="Comma-separated: dense, sink-tail, topk, topk+phi (dense is always run).")
@click.option("--budgets", default="64,256", show_default=True,
              help="Top-K of topk+phi; the other methods get the same token-equivalent reads.")
@click.option("--tasks", default="niah_single,niah_essay,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,kl,attn",
              show_default=True, help="Comma-separated task names.")
@click.option("--context", "contexts", default="2048", show_default=True, help="Comma-separated lengths in tokens.")
@click.option("--samples", type=int, default=5, show_default=True, help="Samples per task and context.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(RUNTIMES), default="auto", show_default=True)
@click.option("--n-sink", type=int, default=4, show_default=True)
@click.option("--n-tail", type=int, default=64, show_default=True)
@click.option("--selection", type=click.Choice(["exact", "page"]), default="page", show_default=True)
@click.option("--page-size", type=int, default=16, show_default=True)
@click.option("--feature-map", type=click.Choice(["prf", "taylor2", "learned"]), default="prf", show_default=True,
              help="topk+phi's map; learned: per-layer maps from --phi-file (their query-side parameters count as "
                   "reads, SPEC section 6).")
@click.option("--n-features", type=int, default=64, show_default=True)
@click.option("--kl-tokens", type=int, default=32, show_default=True, help="Teacher-forced decode steps per KL window.")
@click.option("--attn-positions", type=int, default=2, show_default=True,
              help="Decode steps per window for the per-head attention-output error.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@phi_file_option
@user_errors
def eval_command(model, methods, budgets, tasks, contexts, samples, seed, backend, n_sink, n_tail, selection,
                 page_size, feature_map, n_features, kl_tokens, attn_positions, json_out, plot_out, phi_file) -> None:
    """Accuracy on RULER-style tasks, KL and attention error of each method at matched KV reads."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import topkphi
    from topkphi.evaluation.harness import EvalSpec, evaluate, n_units

    check_phi_options(feature_map, phi_file)
    base = topkphi.Config(n_sink=n_sink, n_tail=n_tail, selection=selection, page_size=page_size,
                          feature_map=None if feature_map == "learned" else feature_map, n_features=n_features,
                          seed=seed)
    spec = EvalSpec(methods=_names(methods, "--methods"), budgets=_ints(budgets, "--budgets"),
                    tasks=_names(tasks, "--tasks"), contexts=_ints(contexts, "--context"), samples=samples,
                    seed=seed, base=base, kl_tokens=kl_tokens, attn_positions=attn_positions)
    spec.validate()
    if plot_out is not None and plot_out.suffix.lower() != ".png":
        raise ValueError(f"--plot writes a PNG: {plot_out} does not end in .png")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # logs keep whole tables
    err = Console(stderr=True, highlight=False)
    runner, runtime = load_runner(model, backend)
    if phi_file is not None:
        spec.maps = load_maps(phi_file, runner, model, runtime.framework, base, spec.budgets,
                              lambda text: err.print(f"[dim]{text}[/dim]"))
        spec.validate()
        n_features = spec.maps[0].n_features
    err.print(f"[dim]{model} on {runtime.device} ({runtime.kernel_backend})[/dim]")
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
                   "feature_map": feature_map, "n_features": n_features, "phi_file": phi_file},
        "results": out["results"], "rows": out["rows"],
    }
    render(console, report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        err.print(f"[dim]wrote {json_out}[/dim]")
    if plot_out is not None:
        plot(report, plot_out)
        err.print(f"[dim]wrote {plot_out}[/dim]")



