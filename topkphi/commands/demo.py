"""`topkphi demo`: the method on synthetic KV, every variant at matched token-equivalent reads."""

from __future__ import annotations

import json

import click

from topkphi.commands.errors import user_errors


@click.command()
@click.option("--backend", default="numpy", show_default=True, help="Backend to run (numpy is the float64 oracle).")
@click.option("--n-tokens", default=4096, show_default=True, help="Context length N.")
@click.option("--top-k", default=128, show_default=True, help="Retrieved mid tokens per KV head.")
@click.option("--n-sink", default=4, show_default=True)
@click.option("--n-tail", default=64, show_default=True)
@click.option("--n-features", default=64, show_default=True, help="Feature-map size m for prf.")
@click.option("--score-std", default=1.0, show_default=True, help="Spread of background scores (low = high entropy).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def demo(backend, n_tokens, top_k, n_sink, n_tail, n_features, score_std, seed, as_json) -> None:
    """Top-K only vs Top-K + phi against dense, on random KV."""
    import numpy as np

    import topkphi
    from topkphi.synthetic import attention_problem

    be = topkphi.get_backend(backend)
    q, k, v = (to_native(x, backend) for x in attention_problem(seed, n_tokens=n_tokens, score_std=score_std))
    ref = np.asarray(be.dense(q, k, v), np.float64)
    d = int(k.shape[-1])
    rows = []
    for selection in ("exact", "page"):
        for feature_map in ("prf", "taylor2", None):
            cfg = topkphi.Config(n_sink=n_sink, n_tail=n_tail, top_k=top_k, selection=selection,
                                 feature_map=feature_map, n_features=n_features, seed=seed)
            if feature_map is None:  # Top-K only gets the prf summary's reads as extra tokens
                prf = topkphi.Config(top_k=top_k, n_features=n_features, selection=selection)
                cfg = topkphi.Config(n_sink=n_sink, n_tail=n_tail, top_k=topkphi.matched_top_k(prf, d),
                                     selection=selection, feature_map=None)
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
