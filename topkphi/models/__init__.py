"""Model resolution for ``topkphi chat --model``: aliases, local folders, .gguf files, hub ids.

Importing this package imports no framework; torch, transformers and mlx load on first use.
"""

from topkphi.models.errors import ModelError
from topkphi.models.fetch import cache_root
from topkphi.models.resolve import (
    ALIASES,
    BACKENDS,
    DEFAULT_MODEL,
    ResolvedModel,
    load_mlx_model,
    load_torch_model,
    resolve_model,
)

__all__ = [
    "ALIASES", "BACKENDS", "DEFAULT_MODEL", "ModelError", "ResolvedModel",
    "cache_root", "load_mlx_model", "load_torch_model", "resolve_model",
]
