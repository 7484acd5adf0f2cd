"""`topkphi eval --plot`: accuracy and KL against the fraction of the KV cache read, one marker per method."""

from __future__ import annotations

from pathlib import Path

NUMERIC = {"kl", "attn"}


def map_name(report: dict) -> str:
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
                 f"budgets {budgets}\n({report['config']['selection']} selection, {map_name(report)}; "
                 "methods at one budget read the same and are drawn slightly apart)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
