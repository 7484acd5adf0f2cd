"""`topkphi demo`: the method on synthetic KV, every variant at matched token-equivalent reads."""

from __future__ import annotations

import json

import click

from topkphi.commands.errors import user_errors
from topkphi.commands.options import DEFAULTS, KV_BACKENDS, backend_option, estimator_names
from topkphi.config import SELECTIONS

DEMO_BACKEND_HELP = ("Backend that runs the decode, as `topkphi backends` names them (numpy is the float64 oracle); "
                     "auto: triton on a CUDA GPU, else torch, else mlx, else numpy.")


def demo_estimators() -> list[str]:
    """The estimators a name alone configures (no phi file, no reference queries), and Top-K only."""
    import topkphi

    names = []
    for name in estimator_names():
        if name == "none":
            continue
        try:
            cfg = topkphi.Config(feature_map=name, selection="compact" if name == "compact" else DEFAULTS.selection)
        except ValueError:  # learned maps need a phi file
            continue
        if not cfg.fitted:  # fitted summaries need the queries of a real prefill
            names.append(name)
    return [*names, None]


def kv_backend(name: str) -> str:
    if name != "auto":
        return "torch" if name == "cpu" else "triton" if name == "cuda" else name
    import topkphi
    from topkphi.commands.runtime import cuda_available

    usable = topkphi.available_backends()
    for candidate in (("triton",) if cuda_available() else ()) + ("torch", "mlx", "numpy"):
        if candidate in usable:
            return candidate
    return "numpy"


@click.command()
@backend_option(names=KV_BACKENDS, default="numpy", help=DEMO_BACKEND_HELP)
@click.option("--n-tokens", default=4096, show_default=True, help="Context length N.")
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True, help="Retrieved mid tokens per KV head.")
@click.option("--n-sink", default=DEFAULTS.n_sink, show_default=True)
@click.option("--n-tail", default=DEFAULTS.n_tail, show_default=True)
@click.option("--page-size", default=DEFAULTS.page_size, show_default=True)
@click.option("--n-features", default=DEFAULTS.n_features, show_default=True, help="Feature-map size m for prf.")
@click.option("--score-std", default=1.0, show_default=True, help="Spread of background scores (low = high entropy).")
@click.option("--seed", default=DEFAULTS.seed, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def demo(backend, n_tokens, top_k, n_sink, n_tail, page_size, n_features, score_std, seed, as_json) -> None:
    """Top-K only vs Top-K + phi against dense, on random KV."""
    import numpy as np

    import topkphi
    from topkphi.synthetic import attention_problem

    backend = kv_backend(backend)
    be = topkphi.get_backend(backend)
    q, k, v = (to_native(x, backend) for x in attention_problem(seed, n_tokens=n_tokens, score_std=score_std))
    ref = np.asarray(be.dense(q, k, v), np.float64)
    d = int(k.shape[-1])
    rows = []
    for selection in (s for s in SELECTIONS if s != "compact"):  # compact pages are fitted from real queries
        for feature_map in demo_estimators():
            cfg = topkphi.Config(n_sink=n_sink, n_tail=n_tail, top_k=top_k, selection=selection, page_size=page_size,
                                 feature_map=feature_map, n_features=n_features, seed=seed)
            if feature_map is None:  # Top-K only gets the prf summary's reads as extra tokens
                prf = cfg.replace(feature_map="prf")
                cfg = cfg.replace(top_k=topkphi.matched_top_k(prf, d))
            summary = be.build_summary(k, v, cfg)
            out, stats = be.decode(q, k, v, summary, cfg)
            out = np.asarray(out, np.float64)
            rows.append({
                "selection": selection,
                "method": "top-k only" if feature_map is None else f"top-k + {feature_map}",
                "top_k": cfg.top_k,
                "kv_read_fraction": stats.read_fraction(),
                "rel_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                "rho": float(np.asarray(stats.rho, np.float64).mean()),
            })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{backend}: N={n_tokens}, sink {n_sink} + tail {n_tail}, score std {score_std}")
    for column in ("selection", "method", "top_k", "KV read / step", "rel. error vs dense", "mean rho"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["selection"], r["method"], str(r["top_k"]), f"{r['kv_read_fraction']:.1%}",
                      f"{r['rel_error']:.4f}", f"{r['rho']:.3f}")
    Console().print(table)


def to_native(x, backend: str):
    """A NumPy array as the backend's own array type."""
    if backend in ("torch", "triton"):
        import torch

        return torch.from_numpy(x).to("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    if backend == "mlx":
        import mlx.core as mx

        return mx.array(x)
    return x
