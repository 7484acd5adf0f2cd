"""Per-head budgets (SPEC 10) against a fixed K at equal mean reads, on a real model's captured KV.

    python examples/budget_fidelity.py --tokens 2048 --texts hamlet,macbeth --json budget.json

Per text and layer the summary is built at prefill P = N - positions, fitted from the prompt's own
last ``fit_window`` query rows; the next ``positions`` decode steps append and decode as chat does
(torch backend, float32, the product's path). For each selector+estimator:

- ``fixed K``: the default budget;
- ``mass d``: the dropped-mass budget at target d (cap ``--cap``, floor ``--floor``), and ``fixed@mass d``:
  a fixed budget at the mass run's own mean retrieved tokens per KV head (rounded to whole pages), i.e.
  the comparison at equal mean reads;
- ``marginal K``: the layer's total of K per head spread by marginal gain (equal mean reads by design);
- ``certify d`` (page and exact selection): how often the certificate reaches d, and whether the true
  dropped mass ever exceeds it (it must not).

Error = mean relative attention-output error vs dense over texts x layers x steps x query heads.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import topkphi
from topkphi.capture import capture_ids
from topkphi.evaluation.text import plays
from topkphi.models.resolve import load_torch_model

BACKEND = topkphi.get_backend("torch")
METHODS = {"compact+compact": ("compact", "compact"), "exact+cluster": ("exact", "cluster"),
           "quest": ("page", None), "quest+cluster": ("page", "cluster")}


def run_layer(cap, cfg: topkphi.Config, n_prefill: int, positions: int) -> dict:
    """Per step: relative errors [Hq], retrieved tokens per KV head, true and estimated/certified drops."""
    k, v, q = (torch.from_numpy(np.asarray(x, np.float32)) for x in (cap.k, cap.v, cap.q))
    n_tokens, n_q = k.shape[2], q.shape[2]
    window = min(cfg.fit_window, n_prefill)
    queries = topkphi.ReferenceQueries(q[:, :, n_q - positions - window: n_q - positions], end=n_prefill)
    summary = BACKEND.build_summary(k[:, :, :n_prefill], v[:, :, :n_prefill], cfg, queries=queries)
    out = {"err": [], "tokens": [], "reads": [], "truth": [], "delta_hat": [], "delta_bar": []}
    for t in range(n_prefill, n_tokens):
        kt, vt = k[:, :, : t + 1], v[:, :, : t + 1]
        summary = BACKEND.append(summary, kt, vt, cfg)
        qt = q[:, :, n_q - (n_tokens - t)]
        got, stats = BACKEND.decode(qt, kt, vt, summary, cfg)
        ref = BACKEND.dense(qt, kt, vt, cfg.scale)
        out["err"].append((torch.linalg.norm(got - ref, dim=-1) / torch.linalg.norm(ref, dim=-1))[0].tolist())
        out["tokens"].append(stats.n_selected[0].float().tolist())
        out["reads"].append(float(stats.token_equivalents.float().mean()) / (t + 1))
        out["truth"].append(true_dropped(qt, kt, stats, cfg).tolist())
        if stats.budget is not None:
            out["delta_hat"].append(stats.budget.delta_hat[0].tolist())
            if stats.budget.delta_bar is not None:
                out["delta_bar"].append(stats.budget.delta_bar[0].tolist())
    return out


def true_dropped(q, k, stats, cfg) -> np.ndarray:
    """``[Hkv]``: the group's largest true softmax mass on mid tokens outside the read set."""
    n_kv, n_q, n = k.shape[1], q.shape[1], k.shape[2]
    qg = q[0].double().reshape(n_kv, n_q // n_kv, -1)
    p = torch.softmax(cfg.tau(k.shape[-1]) * qg @ k[0].double().transpose(-1, -2), dim=-1)
    r = stats.plan.regions
    unread = torch.zeros(n_kv, n, dtype=torch.bool)
    unread[:, r.mid_start:r.mid_end] = True
    for g in range(n_kv):
        sel = stats.selected[0, g]
        unread[g, sel[sel >= 0]] = False
    return (p * unread[:, None]).sum(-1).amax(-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--positions", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--cap", type=int, default=512)
    parser.add_argument("--floor", type=int, default=16)
    parser.add_argument("--deltas", default="0.05,0.2")
    parser.add_argument("--texts", default="hamlet,macbeth")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", default="all")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    net, tokenizer = load_torch_model("smollm2-135m", "cpu", progress=False)
    texts = dict(plays())
    deltas = [float(x) for x in args.deltas.split(",")]
    results: dict[str, dict] = {}
    started = time.time()
    for name in args.texts.split(","):
        ids = tokenizer(texts[name], add_special_tokens=False)["input_ids"][: args.tokens]
        caps = capture_ids(net, ids, "torch", n_queries=256 + args.positions)
        layers = range(len(caps)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
        n_prefill = len(ids) - args.positions
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(name, total=len(layers) * len(args.methods.split(",")))
            for layer in layers:
                for method in args.methods.split(","):
                    selection, estimator = METHODS[method]
                    base = topkphi.Config(n_sink=4, n_tail=64, top_k=args.top_k, selection=selection, page_size=16,
                                          feature_map=estimator, scale=caps[layer].scale)
                    runs = {"fixed": base, "marginal": base.replace(budget="marginal", min_top_k=args.floor)}
                    for delta in deltas:
                        runs[f"mass {delta}"] = base.replace(budget="mass", max_dropped_mass=delta, top_k=args.cap,
                                                             min_top_k=args.floor)
                        if selection != "compact":
                            runs[f"certify {delta}"] = runs[f"mass {delta}"].replace(certify=True)
                    for label, cfg in list(runs.items()):
                        res = run_layer(caps[layer], cfg, n_prefill, args.positions)
                        _add(results, method, label, res)
                        if label.startswith("mass"):  # the fixed budget at this run's own mean reads
                            mean_tokens = float(np.mean(res["tokens"]))
                            k_eq = max(1, int(round(mean_tokens / (1 if selection == "exact" else 16))))
                            k_eq *= 1 if selection == "exact" else 16
                            _add(results, method, f"fixed@{label}", run_layer(caps[layer], base.replace(top_k=k_eq),
                                                                              n_prefill, args.positions))
                    bar.advance(task)
    rows = report(console, results, args, time.time() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _add(results, method, label, res) -> None:
    entry = results.setdefault(f"{method}|{label}", {key: [] for key in res})
    for key, value in res.items():
        entry[key].extend(value if key != "reads" else [float(np.mean(value))])


def report(console, results, args, seconds: float) -> list[dict]:
    table = Table(title=f"per-head budgets vs fixed K at equal mean reads ({seconds:.0f} s; {args.texts}, "
                        f"N={args.tokens}, {args.positions} steps x layers)")
    for col in ("method", "budget", "reads", "tok/head mean", "p95", "err (± s.e.)", "true drop", "est drop",
                "cert holds", "truth <= cert"):
        table.add_column(col)
    rows = []
    for key, r in results.items():
        method, label = key.split("|")
        err, tokens, truth = np.array(r["err"]), np.array(r["tokens"]), np.array(r["truth"])
        row = {"method": method, "budget": label, "reads": float(np.mean(r["reads"])), "err": float(err.mean()),
               "err_se": float(err.std() / np.sqrt(err.size)), "tokens_mean": float(tokens.mean()),
               "tokens_p95": float(np.percentile(tokens, 95)), "true_drop": float(truth.mean())}
        if r["delta_hat"]:
            row["est_drop"] = float(np.mean(r["delta_hat"]))
        if r["delta_bar"]:
            bar, delta = np.array(r["delta_bar"]), float(label.split()[-1])
            row["cert_holds"] = float((bar <= delta).mean())
            row["truth_le_cert"] = float((truth <= bar + 1e-6).mean())
        rows.append(row)
        table.add_row(method, label, f"{row['reads']:.3f}", f"{row['tokens_mean']:.0f}", f"{row['tokens_p95']:.0f}",
                      f"{row['err']:.4f}±{row['err_se']:.4f}", f"{row['true_drop']:.3f}",
                      f"{row.get('est_drop', float('nan')):.3f}", f"{row.get('cert_holds', float('nan')):.0%}",
                      f"{row.get('truth_le_cert', float('nan')):.0%}")
    console.print(table)
    return rows


if __name__ == "__main__":
    main()
