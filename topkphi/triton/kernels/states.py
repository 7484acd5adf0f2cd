"""Unnormalized softmax states in Triton (SPEC 5): the pieces every decode kernel merges with.

A state is ``(m, l, acc)``: running max ``m``, mass ``exp(m) * l`` and weighted values ``exp(m) * acc``.
"""

import triton
import triton.language as tl


@triton.jit
def exp_diff(a, b):
    """exp(a - b), 0 where a is -inf (b may be -inf too)."""
    return tl.where(a == float("-inf"), 0.0, tl.exp(a - tl.where(b == float("-inf"), 0.0, b)))


@triton.jit
def state_merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge two unnormalized softmax states (m [R], l [R], acc [R, dv]) into one."""
    m = tl.maximum(m_a, m_b)
    alpha = exp_diff(m_a, m)
    beta = exp_diff(m_b, m)
    return m, l_a * alpha + l_b * beta, acc_a * alpha[:, None] + acc_b * beta[:, None]


@triton.jit
def online_update(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold scores ``s [R, BLOCK]`` (-inf: absent) with values ``v [BLOCK, dv]`` into the state ``(m, l, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = exp_diff(m_i, m_new)
    p = exp_diff(s, m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc
