"""Build a summary over random KV and compare Top-K only with Top-K + phi against dense attention.

    python examples/random_kv.py
"""

import numpy as np

import topkphi
from topkphi.synthetic import attention_problem

q, k, v = attention_problem(seed=0, n_q_heads=8, n_kv_heads=2, n_tokens=4096, d=64, score_std=0.5)
be = topkphi.get_backend("numpy")  # the float64 oracle; "torch", "triton" or "mlx" take their own arrays
ref = be.dense(q, k, v)

with_phi = topkphi.Config(n_sink=4, n_tail=64, top_k=128, selection="page", feature_map="prf", n_features=64)
# the baseline spends the summary's reads on extra retrieved tokens instead
top_k_only = topkphi.Config(n_sink=4, n_tail=64, top_k=topkphi.matched_top_k(with_phi, d=64),
                            selection="page", feature_map=None)

for name, cfg in (("top-k only", top_k_only), ("top-k + phi", with_phi)):
    summary = be.build_summary(k, v, cfg)  # at prefill; be.append(summary, k, v, cfg) after each new token
    out, stats = be.decode(q, k, v, summary, cfg)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"{name:12s} top_k={cfg.top_k:4d}  KV read/step {stats.read_fraction():6.1%}  "
          f"rel. error vs dense {err:.4f}  estimated unread mass {stats.rho.mean():.3f}")
