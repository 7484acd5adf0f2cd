"""Feature maps phi(x) = exp(c(x)) * f(x) with phi_q(q) . phi_k(k) ~ exp(tau <q, k>) (SPEC section 4).

A map is data, not code: every backend evaluates the same parameters, so the PRF draw is
made once here and handed to each backend as arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURE_MAP_KINDS = ("prf", "taylor2", "learned")


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One attention layer's feature maps.

    ``prf`` and ``learned`` are exp-linear: ``l(x) = w @ x~ + b - norm_coef * |x~|^2 / 2``,
    ``c = max_i l_i``, ``f = exp(l - c)``; their parameters have a leading head axis of
    size 1 (shared by all KV heads) or ``Hkv``. ``taylor2`` has no parameters.
    """

    kind: str
    d: int
    w_q: np.ndarray | None = None  # [H', m, d]
    b_q: np.ndarray | None = None  # [H', m]
    w_k: np.ndarray | None = None  # [H', m, d]
    b_k: np.ndarray | None = None  # [H', m]
    norm_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_MAP_KINDS:
            raise ValueError(f"unknown feature map kind {self.kind!r}; expected one of {FEATURE_MAP_KINDS}")
        if self.kind == "taylor2":
            return
        params = {"w_q": self.w_q, "b_q": self.b_q, "w_k": self.w_k, "b_k": self.b_k}
        missing = [name for name, p in params.items() if p is None]
        if missing:
            raise ValueError(f"{self.kind} feature map needs parameters {missing}")
        n_heads, m, d = np.shape(self.w_q)
        if d != self.d:
            raise ValueError(f"feature map w_q has d={d}, expected {self.d}")
        for name, shape in (("w_k", (n_heads, m, d)), ("b_q", (n_heads, m)), ("b_k", (n_heads, m))):
            if np.shape(params[name]) != shape:
                raise ValueError(f"feature map {name} has shape {np.shape(params[name])}, expected {shape}")
        for name, p in params.items():
            if not np.all(np.isfinite(p)):
                raise ValueError(f"feature map {name} holds NaN or Inf")

    @classmethod
    def prf(cls, d: int, n_features: int, seed: int = 0) -> FeatureMap:
        """FAVOR+ positive random features; unbiased for exp(tau <q, k>)."""
        omega = np.random.default_rng(seed).standard_normal((n_features, d))[None]
        bias = np.full((1, n_features), -0.5 * np.log(n_features))
        return cls("prf", d, omega, bias, omega, bias, norm_coef=1.0)

    @classmethod
    def taylor2(cls, d: int) -> FeatureMap:
        """Second-order Taylor map: phi(q) . phi(k) = 1 + s + s^2 / 2."""
        return cls("taylor2", d)

    @classmethod
    def learned(cls, w_q: np.ndarray, b_q: np.ndarray, w_k: np.ndarray, b_k: np.ndarray) -> FeatureMap:
        """Calibrated exp-linear maps; parameters ``[Hkv, m, d]`` and ``[Hkv, m]``."""
        arrays = [np.asarray(a, dtype=np.float64) for a in (w_q, b_q, w_k, b_k)]
        if arrays[0].ndim == 2:  # one head's maps
            arrays = [a[None] for a in arrays]
        return cls("learned", arrays[0].shape[-1], *arrays, norm_coef=0.0)

    @property
    def exp_linear(self) -> bool:
        return self.kind != "taylor2"

    @property
    def n_features(self) -> int:
        if self.kind == "taylor2":
            return 1 + self.d + self.d * self.d
        return int(np.shape(self.w_q)[1])

    @property
    def n_param_heads(self) -> int:
        """Leading axis of the parameters: 1 when shared by all KV heads."""
        return 1 if self.kind == "taylor2" else int(np.shape(self.w_q)[0])

    def query_param_count(self) -> int:
        """Query-side parameters read per KV head per step (SPEC section 6 counts learned maps only)."""
        return self.n_features * (self.d + 1) if self.kind == "learned" else 0

    def check_heads(self, n_kv_heads: int) -> None:
        if self.n_param_heads not in (1, n_kv_heads):
            raise ValueError(
                f"feature map has parameters for {self.n_param_heads} KV heads, the cache has {n_kv_heads}"
            )
