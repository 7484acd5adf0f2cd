"""Seeded synthetic decode problems with attention-like structure, for demos and benchmarks.

Background keys give scores ~ N(0, score_std^2) (a high-entropy head when score_std is small);
a few needles sit ``needle_gap`` above them, which is what Top-K is good at finding.
"""

from __future__ import annotations

import numpy as np


def attention_problem(
    seed: int = 0,
    *,
    batch: int = 1,
    n_q_heads: int = 8,
    n_kv_heads: int = 2,
    n_tokens: int = 4096,
    d: int = 64,
    score_std: float = 1.0,
    n_needles: int = 16,
    needle_gap: float = 4.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q [B,Hq,d], k [B,Hkv,N,d], v [B,Hkv,N,d])`` as float32 arrays."""
    rng = np.random.default_rng(seed)
    group = n_q_heads // n_kv_heads
    tau = d**-0.5
    k = rng.standard_normal((batch, n_kv_heads, n_tokens, d))
    # one direction per KV head shared by its query heads, so the group agrees on what matters
    direction = rng.standard_normal((batch, n_kv_heads, 1, d))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    q = direction + 0.3 * rng.standard_normal((batch, n_kv_heads, group, d)) / np.sqrt(d)
    q *= score_std / (tau * np.linalg.norm(q, axis=-1, keepdims=True))  # tau * <q, k> ~ N(0, score_std^2)
    needles = rng.choice(n_tokens, size=(batch, n_kv_heads, min(n_needles, n_tokens)), replace=True)
    for b in range(batch):
        for g in range(n_kv_heads):
            k[b, g, needles[b, g]] += (needle_gap / score_std) * direction[b, g, 0]
    # values share a per-head mean, as real heads' do, so the dense output is not ~0
    v = rng.standard_normal((batch, n_kv_heads, 1, d)) + rng.standard_normal((batch, n_kv_heads, n_tokens, d))
    return (q.reshape(batch, n_q_heads, d).astype(np.float32), k.astype(np.float32), v.astype(np.float32))
