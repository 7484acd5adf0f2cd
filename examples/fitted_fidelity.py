"""Attention-output error of every selector x estimator at matched reads, on a real model's captured KV.

    python examples/fitted_fidelity.py --tokens 2048 --top-k 64,256 --texts hamlet,macbeth --json out.json

Per text and layer the summary is built at prefill position P = N - positions, fitted from the
prompt's own last ``fit_window`` query rows (positions before P only); the next ``positions``
decode steps append and decode as chat would (fold-in, tail mass). Each method is compared with
the Top-K-only baseline of the same selector given the estimator's reads as extra tokens
(``matched_top_k``). Float64 oracle on float32 captures of SmolLM2-135M (torch, CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import topkphi
from topkphi.capture import capture_ids
from topkphi.evaluation.text import plays
from topkphi.models.resolve import load_torch_model

ORACLE = topkphi.get_backend("numpy")
METHODS = {  # name -> (selection, estimator)
    "exact": ("exact", None), "exact+cluster": ("exact", "cluster"), "exact+prf": ("exact", "prf"),
    "quest": ("page", None), "quest+cluster": ("page", "cluster"),
    "compact": ("compact", None), "compact+compact": ("compact", "compact"), "compact+cluster": ("compact", "cluster"),
}


def layer_errors(cap, cfg: topkphi.Config, n_prefill: int, positions: int):
    """Relative errors ``[positions, Hq]``, reads (fraction), estimated and true unread mass per step."""
    k, v, q = (np.asarray(x, np.float64) for x in (cap.k, cap.v, cap.q))
    n_tokens, n_q = k.shape[2], q.shape[2]
    window = min(cfg.fit_window, n_prefill)
    rows = q[:, :, n_q - positions - window: n_q - positions]  # the prompt's last rows, before P
    queries = topkphi.ReferenceQueries(rows, end=n_prefill)
    summary = ORACLE.build_summary(k[:, :, :n_prefill], v[:, :, :n_prefill], cfg, queries=queries)
    errs, reads, rho, truth = [], [], [], []
    for t in range(n_prefill, n_tokens):
        summary = ORACLE.append(summary, k[:, :, : t + 1], v[:, :, : t + 1], cfg)
        qt = q[:, :, n_q - (n_tokens - t)]
        out, stats = ORACLE.decode(qt, k[:, :, : t + 1], v[:, :, : t + 1], summary, cfg)
        ref = ORACLE.dense(qt, k[:, :, : t + 1], v[:, :, : t + 1], cfg.scale)
        errs.append(np.linalg.norm(out - ref, axis=-1)[0] / np.linalg.norm(ref, axis=-1)[0])
        reads.append(float(stats.token_equivalents.mean()) / (t + 1))
        rho.append(stats.rho[0])
        truth.append(_unread_mass(qt, k[:, :, : t + 1], stats, cfg))
    return np.array(errs), np.array(reads), np.array(rho), np.array(truth)


def _unread_mass(q, k, stats, cfg) -> np.ndarray:
    """True softmax mass outside the read set, per query head."""
    n_kv, n_q, n = k.shape[1], q.shape[1], k.shape[2]
    tau = cfg.tau(k.shape[-1])
    r = topkphi.Regions.of(n, cfg.n_sink, cfg.n_tail)
    out = np.zeros(n_q)
    for h in range(n_q):
        g = h // (n_q // n_kv)
        s = tau * k[0, g] @ q[0, h]
        p = np.exp(s - s.max())
        p /= p.sum()
        read = np.zeros(n, bool)
        read[: r.sink_end] = read[r.mid_end:] = True
        sel = stats.selected[0, g]
        read[sel[sel >= 0]] = True
        out[h] = p[~read].sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--top-k", default="64,256")
    parser.add_argument("--texts", default="hamlet,macbeth")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", default="all")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--n-clusters", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    console = Console()
    net, tokenizer = load_torch_model("smollm2-135m", "cpu", progress=False)
    texts = dict(plays())
    results: dict[str, dict] = {}
    budgets = [int(x) for x in args.top_k.split(",")]
    methods = args.methods.split(",")
    started = time.time()
    for name in args.texts.split(","):
        ids = tokenizer(texts[name], add_special_tokens=False)["input_ids"][: args.tokens]
        caps = capture_ids(net, ids, "torch", n_queries=256 + args.positions)
        layers = range(len(caps)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
        d = caps[0].k.shape[-1]
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(name, total=len(layers) * len(budgets) * len(methods) * 2)
            for layer in layers:
                for top_k in budgets:
                    for method in methods:
                        selection, estimator = METHODS[method]
                        cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=top_k, selection=selection,
                                             page_size=args.page_size, feature_map=estimator,
                                             n_clusters=args.n_clusters, n_features=64, scale=caps[layer].scale)
                        base = cfg.replace(feature_map=None, top_k=topkphi.matched_top_k(cfg, d))
                        for label, c in ((method, cfg), (f"{selection}-matched", base)):
                            errs, reads, rho, truth = layer_errors(caps[layer], c, len(ids) - args.positions,
                                                                   args.positions)
                            key = f"{method}|{top_k}|{label}"
                            entry = results.setdefault(key, {"err": [], "reads": [], "rho": [], "truth": []})
                            entry["err"].append(errs.mean(axis=1).tolist())
                            entry["reads"].append(float(reads.mean()))
                            entry["rho"].append(rho.ravel().tolist())
                            entry["truth"].append(truth.ravel().tolist())
                            bar.advance(task)
    table = Table(title=f"attention error at matched reads ({time.time() - started:.0f} s; "
                        f"{args.texts}, N={args.tokens}, {args.positions} steps x layers)")
    for col in ("method", "top_k", "reads", "err", "baseline err", "ratio", "wins", "rho vs truth"):
        table.add_column(col)
    summary = []
    for method in methods:
        selection = METHODS[method][0]
        for top_k in budgets:
            mine = results[f"{method}|{top_k}|{method}"]
            base = results[f"{method}|{top_k}|{selection}-matched"]
            e, b = np.array(mine["err"]).ravel(), np.array(base["err"]).ravel()
            ratio = np.array(mine["err"]).mean(axis=1) / np.array(base["err"]).mean(axis=1)  # per (text, layer)
            rho, truth = np.concatenate(mine["rho"]), np.concatenate(mine["truth"])
            rel = float(np.abs(rho.sum() - truth.sum()) / max(truth.sum(), 1e-30))
            row = {"method": method, "top_k": top_k, "reads": float(np.mean(mine["reads"])), "err": float(e.mean()),
                   "err_se": float(e.std() / np.sqrt(e.size)), "baseline_err": float(b.mean()),
                   "ratio": float(e.mean() / b.mean()), "wins": float((ratio < 1).mean()),
                   "rho_corr": float(np.corrcoef(rho, truth)[0, 1]) if rho.std() > 0 else None, "rho_rel_err": rel}
            summary.append(row)
            table.add_row(method, str(top_k), f"{row['reads']:.3f}", f"{row['err']:.4f}±{row['err_se']:.4f}",
                          f"{row['baseline_err']:.4f}", f"{row['ratio']:.2f}", f"{row['wins']:.0%}",
                          "-" if row["rho_corr"] is None else f"r={row['rho_corr']:.2f} sum {rel:.0%}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": summary}, f, indent=1)


if __name__ == "__main__":
    main()
