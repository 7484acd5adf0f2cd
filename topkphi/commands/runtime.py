"""The one place that knows torch from MLX: which runtime a ``--backend`` name means, and what every model
command does through it (load a model, capture q/k/v, fingerprint it for a phi file, make a generation
engine or an evaluation runner). Frameworks are imported only when a method needs them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import click


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _metal() -> bool:
    if not _has("mlx"):
        return False
    import mlx.core as mx

    return mx.metal.is_available()


def _hf() -> bool:
    return _has("torch") and _has("transformers")


def _mlx_lm() -> bool:
    return _has("mlx") and _has("mlx_lm")


@dataclass(frozen=True)
class Runtime:
    framework: str  # "torch" or "mlx"
    device: str  # "cuda", "cpu", "metal" or "mlx-cpu"
    kernel_backend: str  # the topkphi backend that runs decode: "torch", "triton" or "mlx"

    def describe(self) -> str:
        return f"{self.framework} on {self.device}, {self.kernel_backend} decode"

    @property
    def fit_device(self) -> str:
        """Where per-prompt fits run (in torch): next to a CUDA model, else on the CPU (MLX models too)."""
        return "cuda" if self.device == "cuda" else "cpu"

    def load(self, model: str):
        """``(net, tokenizer)`` for a ``--model`` spec on this runtime."""
        from topkphi.models import resolve

        if self.framework == "torch":
            return resolve.load_torch_model(model, device=self.device)
        return resolve.load_mlx_model(model)

    def kernel(self):
        import topkphi

        return topkphi.get_backend(self.kernel_backend)

    def engine(self, net, tokenizer, cfg, backend=None, **kwargs):
        """A generation engine; ``cfg=None`` decodes densely, otherwise through ``backend`` (default: ours)."""
        if self.framework == "torch":
            from topkphi.generation.torch_engine import TorchEngine as engine_class
        else:
            from topkphi.generation.mlx_engine import MLXEngine as engine_class
        if cfg is not None and backend is None:
            backend = self.kernel()
        return engine_class(net, tokenizer, cfg, None if cfg is None else backend, **kwargs)

    def runner(self, net, tokenizer):
        """The evaluation runner: shared dense prefills, one decode session per policy."""
        from topkphi.evaluation.runners import Runner

        def make_engine(cfg, backend):
            return self.engine(net, tokenizer, cfg, backend)

        return Runner(make_engine, lambda ids, n: self.capture(net, ids, n), tokenizer, self.kernel())

    def capture(self, net, ids: list[int], n_queries: int | None = None):
        """Every layer's q/k/v on token ids (``topkphi.capture.LayerCapture``), the last ``n_queries`` queries."""
        from topkphi.capture import capture_ids

        return capture_ids(net, list(ids), self.framework, n_queries)

    def fingerprint(self, net, model_id: str):
        from topkphi.calibration.phi_file import mlx_fingerprint, torch_fingerprint

        return (torch_fingerprint if self.framework == "torch" else mlx_fingerprint)(net, model_id)


def read_phi_file(phi_file: str):
    """``(maps, meta)`` of a phi file, checked on its own (before any model loads: a bad file costs nothing)."""
    from topkphi.calibration.phi_file import load_phi

    return load_phi(phi_file)


def check_phi_model(phi_file: str, meta, runtime: Runtime, net, model_id: str, cfg=None, warn=None) -> None:
    """The file was made for the loaded model (ValueError: one line); a note when its budgets differ."""
    from topkphi.calibration.phi_file import check_model

    check_model(meta, runtime.fingerprint(net, model_id))
    if cfg is not None and warn is not None:
        fitted = (meta.n_sink, meta.n_tail, meta.top_k)
        if fitted != (cfg.n_sink, cfg.n_tail, cfg.top_k):
            warn(f"note: {Path(phi_file).name} was fitted for n_sink/n_tail/top_k {fitted}, "
                 f"running with {(cfg.n_sink, cfg.n_tail, cfg.top_k)}")


def usable_runtimes() -> list[str]:
    names = []
    if cuda_available():
        names.append("torch")
        if _has("triton"):
            names.append("triton")
    elif _hf():
        names.append("torch")
    if _mlx_lm():
        names.append("mlx")
    return names


def resolve_runtime(name: str) -> Runtime:
    """``--backend`` name -> runtime. ``auto``: torch on CUDA (Triton kernels where installed), else MLX on
    Metal, else torch on the CPU, else MLX on the CPU. The legacy ``cpu`` and ``cuda`` still work."""
    if name == "auto":
        if cuda_available() and _hf():
            name = "triton" if _has("triton") else "torch"
        elif _mlx_lm() and _metal():
            name = "mlx"
        elif _hf():
            name = "torch"
        elif _mlx_lm():
            name = "mlx"
        else:
            raise click.UsageError('no runtime is installed: pip install "topkphi[mlx]" or "topkphi[torch]"')
    if name == "cuda":
        name = "triton" if _has("triton") else "torch"
        if not cuda_available():
            raise click.UsageError(_unavailable("cuda", "no CUDA GPU with torch here"))
    if name == "numpy":
        raise click.UsageError("--backend numpy runs synthetic KV only (topkphi demo): a model needs torch, triton "
                               "or mlx")
    if name in ("torch", "cpu", "triton") and not _hf():
        raise click.UsageError(_unavailable(name, 'torch and transformers are not installed (pip install '
                                                  '"topkphi[torch]")'))
    if name == "triton" and not (cuda_available() and _has("triton")):
        raise click.UsageError(_unavailable("triton", 'it needs a CUDA GPU and triton (pip install "topkphi[cuda]")'))
    if name == "mlx" and not _mlx_lm():
        raise click.UsageError(_unavailable("mlx", 'mlx and mlx-lm are not installed (pip install "topkphi[mlx]")'))
    if name == "triton":
        return Runtime("torch", "cuda", "triton")
    if name == "torch":
        return Runtime("torch", "cuda" if cuda_available() else "cpu", "torch")
    if name == "cpu":
        return Runtime("torch", "cpu", "torch")
    if name == "mlx":
        return Runtime("mlx", "metal" if _metal() else "mlx-cpu", "mlx")
    raise click.UsageError(f"unknown --backend {name!r}")


def _unavailable(name: str, why: str) -> str:
    return f"--backend {name} is not available: {why}; available: {', '.join(usable_runtimes()) or 'none'}"
