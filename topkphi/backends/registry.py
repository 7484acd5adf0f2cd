"""Name -> backend, importing a framework only when its backend is asked for."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

from topkphi.backends.base import Backend


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run on this machine."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch_ok() -> bool:
    return _has("torch")


def _triton_ok() -> bool:
    if not (_has("torch") and _has("triton")):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def _mlx_ok() -> bool:
    return _has("mlx") and _has("mlx.core")


# name -> (module, class, probe, what to install)
_BACKENDS: dict[str, tuple[str, str, Callable[[], bool], str]] = {
    "numpy": ("topkphi.backends.numpy_backend", "NumpyBackend", lambda: True, "numpy"),
    "torch": ("topkphi.backends.torch_backend", "TorchBackend", _torch_ok, 'pip install "topkphi[torch]"'),
    "triton": (
        "topkphi.backends.triton_backend",
        "TritonBackend",
        _triton_ok,
        'pip install "topkphi[cuda]" on a machine with a CUDA GPU (or TRITON_INTERPRET=1 to run on the CPU)',
    ),
    "mlx": ("topkphi.backends.mlx_backend", "MLXBackend", _mlx_ok, 'pip install "topkphi[mlx]"'),
}


def backend_names() -> list[str]:
    return list(_BACKENDS)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine (their module must exist too)."""
    names = []
    for name, (module, _, probe, _) in _BACKENDS.items():
        try:
            if _has(module) and probe():
                names.append(name)
        except Exception:  # a broken optional install must not break the core
            continue
    return names


def describe_backends() -> list[tuple[str, bool, str]]:
    """``(name, usable here, how to install it)`` for every known backend."""
    usable = set(available_backends())
    return [(name, name in usable, info[3]) for name, info in _BACKENDS.items()]


def get_backend(name: str, **options) -> Backend:
    """Instantiate backend ``name``; unknown or unusable names raise with the available ones listed."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_BACKENDS)}")
    module, cls, probe, install = _BACKENDS[name]
    if not (_has(module) and probe()):
        raise BackendUnavailable(
            f"backend {name!r} is not available here ({install}); available: {', '.join(available_backends())}"
        )
    return getattr(importlib.import_module(module), cls)(**options)
