"""The fitted estimates of SPEC 8 inside the fused decode, in Triton: clusters and compact pages as pseudo-tokens.

Clusters (8.1). A read tile adds, for its retrieved rows, the per-cluster count, score sum and value sum
(``cluster_tile``: a one-hot of the rows' labels times the tile's scores and values). The merge turns the
fitted sums less those into C pseudo-tokens (``cluster_state``) with logit ``log n'_c + beta_c + tau q.mu'_c``,
where ``tau q.mu'_c = (tau q.K_c - sum_{j in T∩c} s_j) / n'_c``: only the retrieved members' scores are
needed, which the tile computed for the exact part anyway, and ``tau q.K_c`` is read out once per head.

Compact pages (8.2). The score kernel stores every page's per-head logit ``tau q.kappa_p + beta_p`` and the
selection overwrites the chosen pages' with -inf; ``states.online_update`` then folds blocks of pages (logit,
value ``nu_p``) like blocks of tokens, in programs of their own whose states the merge keeps apart as the
estimate.
"""

import triton
import triton.language as tl

from topkphi.triton.kernels.states import exp_diff


@triton.jit
def cluster_tile(s, v, lab, ret, taken, tsc, tv, BLOCK_C: tl.constexpr, PREC: tl.constexpr, PREC3: tl.constexpr):
    """Add a tile's retrieved rows (``ret [BLOCK_N]``, labels ``lab``) to the per-cluster count ``taken [C]``,
    scaled-score sum ``tsc [R, C]`` (scores ``s [R, BLOCK_N]``) and value sum ``tv [C, dv]`` (values ``v``).
    The score sums take ``PREC3`` (tf32x3 on the GPU: a tf32 sum of scores would move the logits by ~1e-3)."""
    offs_c = tl.arange(0, BLOCK_C)
    member = (lab[:, None] == offs_c[None, :]) & ret[:, None]  # [BLOCK_N, BLOCK_C]; label -1 matches nothing
    onehot = member.to(tl.float32)
    taken += tl.sum(onehot, 0)
    tsc += tl.dot(tl.where(ret[None, :], s, 0.0), onehot, input_precision=PREC3)
    tv += tl.dot(tl.trans(member.to(v.dtype)), v, input_precision=PREC)  # 0/1 in the cache dtype: exact
    return taken, tsc, tv


@triton.jit
def cluster_state(count, beta, vsum, qk, taken, tsc, tv):
    """The clusters' pseudo-tokens as one state ``(x_m [1], x_v [1, dv])``: log-mass and normalized value.

    ``count, beta, taken, qk, tsc [BLOCK_C]`` (``qk = tau q.K_c``, ``tsc`` the retrieved members' scaled
    scores), ``vsum, tv [BLOCK_C, dv]``; padding clusters have count 0. A cluster whose members were all
    retrieved (``n'_c = 0``) drops out; ``x_m = -inf`` where none is left (SPEC 8.1)."""
    left = count - taken
    live = left > 0.0
    safe = tl.where(live, left, 1.0)
    logit = tl.where(live, tl.log(safe) + beta + (qk - tsc) / safe, float("-inf"))
    lam = tl.max(logit, 0)
    w = exp_diff(logit, lam)
    den = tl.sum(w, 0)
    num = tl.sum((w / safe)[:, None] * (vsum - tv), 0)  # sum_c w_c vbar'_c
    ok = den > 0.0
    safe_den = tl.where(ok, den, 1.0)
    x_m = tl.zeros([1], tl.float32) + tl.where(ok, lam + tl.log(safe_den), float("-inf"))
    return x_m, (num / safe_den)[None, :]
