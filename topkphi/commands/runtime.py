"""Shared by the model commands: which runtime a --backend name means, and the topkphi flags."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import click

RUNTIMES = ("auto", "cuda", "mlx", "cpu")


@dataclass(frozen=True)
class Runtime:
    framework: str  # "torch" or "mlx"
    device: str  # "cuda", "cpu", "metal" or "mlx-cpu"
    kernel_backend: str  # the topkphi backend that runs decode


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _metal() -> bool:
    if not _has("mlx"):
        return False
    import mlx.core as mx

    return mx.metal.is_available()


def usable_runtimes() -> list[str]:
    names = []
    if _cuda():
        names.append("cuda")
    if _has("mlx") and _has("mlx_lm"):
        names.append("mlx")
    if _has("torch") and _has("transformers"):
        names.append("cpu")
    return names


def resolve_runtime(name: str) -> Runtime:
    """``auto``: CUDA if present, else MLX on Metal, else torch on the CPU, else MLX on the CPU."""
    usable = usable_runtimes()
    if name == "auto":
        if "cuda" in usable:
            name = "cuda"
        elif "mlx" in usable and _metal():
            name = "mlx"
        elif "cpu" in usable:
            name = "cpu"
        elif "mlx" in usable:
            name = "mlx"
        else:
            raise click.UsageError('no runtime is installed: pip install "topkphi[mlx]" or "topkphi[torch]"')
    if name not in usable:
        why = {
            "cuda": "no CUDA GPU with torch here",
            "mlx": 'mlx and mlx-lm are not installed (pip install "topkphi[mlx]")',
            "cpu": 'torch and transformers are not installed (pip install "topkphi[torch]")',
        }[name]
        raise click.UsageError(f"--backend {name} is not available: {why}; available: {', '.join(usable) or 'none'}")
    if name == "cuda":
        return Runtime("torch", "cuda", "triton" if _has("triton") else "torch")
    if name == "cpu":
        return Runtime("torch", "cpu", "torch")
    return Runtime("mlx", "metal" if _metal() else "mlx-cpu", "mlx")


def topkphi_options(fn=None, *, per_prompt: bool = False):
    """The decode-policy flags every model command takes; ``per_prompt`` adds ``--feature-map
    learned-prompt`` (maps fitted on each new prompt, for commands that prefill prompts: chat)."""
    if fn is None:
        return lambda f: topkphi_options(f, per_prompt=per_prompt)
    maps = ["prf", "taylor2", "learned", *(["learned-prompt"] if per_prompt else []), "none"]
    options = [
        click.option("--top-k", type=int, default=256, show_default=True, help="Retrieved mid tokens per KV head."),
        click.option("--n-sink", type=int, default=4, show_default=True, help="First tokens always read exactly."),
        click.option("--n-tail", type=int, default=64, show_default=True, help="Last tokens always read exactly."),
        click.option("--selection", type=click.Choice(["exact", "page"]), default="page", show_default=True,
                     help="How Top-K is found: scoring every key, or Quest-style page bounds."),
        click.option("--page-size", type=int, default=16, show_default=True),
        click.option("--feature-map", type=click.Choice(maps), default="prf",
                     show_default=True, help="Completion of the unread mass; none = Top-K only; "
                     "learned = the maps of --phi-file"
                     + ("; learned-prompt = maps fitted on each new prompt's own queries (warm-started from "
                        "--phi-file if given)." if per_prompt else ".")),
        click.option("--n-features", type=int, default=64, show_default=True, help="Feature-map size m."),
        click.option("--dense", is_flag=True, help="Exact attention over the whole cache (the baseline)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def config_from_options(top_k, n_sink, n_tail, selection, page_size, feature_map, n_features, seed=0):
    import topkphi

    try:
        return topkphi.Config(n_sink=n_sink, n_tail=n_tail, top_k=top_k, selection=selection, page_size=page_size,
                              # learned maps are per layer: filled in once the model is loaded
                              feature_map=None if feature_map in ("none", "learned", "learned-prompt") else feature_map,
                              n_features=n_features, seed=seed)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
