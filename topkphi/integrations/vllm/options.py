"""What a vLLM user sets: a topkphi ``Config`` plus the plugin's own knobs, carried in vLLM's
``additional_config`` under the key ``"topkphi"`` (environment-free; imports neither torch nor vllm).

    --additional-config '{"topkphi": {"top_k": 256, "selection": "page", "feature_map": "prf"}}'

Every ``Config`` field but ``scale`` is accepted (the scale is each layer's own); ``feature_map``
is a name or ``null`` (Top-K only). Plugin knobs: ``backend`` (``auto``, ``torch``, ``triton``)
and ``max_side_mib``, the cap on the side buffers of one worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from topkphi.config import Config

KEY = "topkphi"
BACKENDS = ("auto", "torch", "triton")
DEFAULT_SIDE_MIB = 1024
# vLLM's own kernel runs the prefill, so no prompt queries reach the plugin: the fitted summaries
# (SPEC 8: clusters, compact pages) cannot be fitted and learned maps are not wired in yet. The
# plugin's default is therefore its own, Quest pages with Top-K only, not Config()'s.
VLLM_DEFAULT = Config(selection="page", feature_map=None)


@dataclass(frozen=True)
class VllmOptions:
    """One decode policy for every full-attention layer of a vLLM engine."""

    config: Config = VLLM_DEFAULT
    backend: str = "auto"
    max_side_mib: int = DEFAULT_SIDE_MIB

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"topkphi backend {self.backend!r} is not one of {BACKENDS}")
        if isinstance(self.max_side_mib, bool) or not isinstance(self.max_side_mib, int) or self.max_side_mib < 1:
            raise ValueError(f"max_side_mib must be a positive integer, got {self.max_side_mib!r}")
        fmap = self.config.feature_map
        if fmap is not None and not isinstance(fmap, str):
            raise ValueError("in vLLM, feature_map is a name (prf, taylor2) or None; FeatureMap objects do not travel")
        if self.config.fitted or fmap == "learned":
            raise ValueError(f"selection={self.config.selection!r} with feature_map={fmap!r} is not supported in "
                             "vLLM yet: it is fitted from the prompt's queries, and vLLM's own kernel runs the "
                             "prefill (use selection 'page' or 'exact' with feature_map prf, taylor2 or none)")
        if self.config.scale is not None:
            raise ValueError("scale is each attention layer's own in vLLM; leave it unset")

    @property
    def max_side_bytes(self) -> int:
        return self.max_side_mib << 20

    def to_dict(self) -> dict[str, Any]:
        """The JSON object that goes under ``additional_config["topkphi"]``."""
        defaults = VLLM_DEFAULT
        cfg = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(Config)
               if f.name != "scale" and getattr(self.config, f.name) != getattr(defaults, f.name)}
        return {**cfg, "backend": self.backend, "max_side_mib": self.max_side_mib}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> VllmOptions:
        raw = dict(raw or {})
        backend = raw.pop("backend", "auto")
        max_side_mib = raw.pop("max_side_mib", DEFAULT_SIDE_MIB)
        known = {f.name for f in dataclasses.fields(Config)} - {"scale"}
        unknown = sorted(set(raw) - known)
        if unknown:
            known_all = sorted(known | {"backend", "max_side_mib"})
            raise ValueError(f"unknown topkphi option(s) {unknown}; known: {known_all}")
        return cls(VLLM_DEFAULT.replace(**raw), backend, max_side_mib)

    @classmethod
    def from_additional_config(cls, additional: Any) -> VllmOptions:
        """Options from vLLM's ``additional_config`` (a dict, possibly without our key)."""
        raw = additional.get(KEY) if isinstance(additional, dict) else None
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f'additional_config["{KEY}"] must be a JSON object, got {type(raw).__name__}')
        return cls.from_dict(raw)
