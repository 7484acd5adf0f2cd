"""Metal source of the fused topkphi decode, built with ``mx.fast.metal_kernel`` (imports only mlx).

One threadgroup per (batch, KV head) runs SPEC section 5 for the head's G query heads over the
read set of ``topkphi.step`` (``n_anchor`` sink and tail positions, then the retrieved ``T``, then
-1 padding): gather the rows from the ``[B, Hkv, N, d]`` cache by index, online softmax with a
running max per query head, phi completion for exp-linear maps (prf, learned) with the retrieved
tokens' estimated share computed here from the keys already loaded, one normalization.
Each of the NSG simdgroups takes every NSG-th read-set entry; its 32 lanes split d and dv and
reduce with ``simd_sum``. Accumulation is float32 whatever the input dtype.

It returns ``out``, ``rho`` and ``lse``: ``(out, lse)`` is its attention state in normalized form,
so an estimate made outside the kernel (clusters, compact pages, taylor2) merges with it after
the call (``topkphi/backends/mlx_ops.py``: ``normalized_state``, ``merge``); ``OutT = float`` then.

Launch (see ``topkphi/backends/mlx_metal.py``): grid ``(32 * NSG, B * Hkv, 1)``, threadgroup
``(32 * NSG, 1, 1)``; templates ``InT`` (q/k/v dtype), ``OutT`` (out dtype), ``G, D, DV, M, NSG``
(ints), ``HAS_PHI, PHI_PER_HEAD`` (bools). This source has never been compiled or run on Apple
hardware; on Linux its arithmetic, indexing and barrier structure run under a C++ thread emulation
(``tests/backends/test_mlx_metal.py``), which says nothing about Metal compilation or speed.
"""

from __future__ import annotations

import functools

import mlx.core as mx

INPUT_NAMES = [
    "q",  # [B, Hq, D] InT, row-contiguous
    "k",  # [B, Hkv, N, D] InT, any strides (k_strides)
    "v",  # [B, Hkv, N, DV] InT, any strides (v_strides)
    "read_idx",  # [B, Hkv, R] int32: n_anchor anchors, then T, then -1 (unused slots)
    "w_q",  # [H', M, D] float32 (H' = Hkv when PHI_PER_HEAD, else 1)
    "b_q",  # [H', M] float32
    "w_k",  # [H', M, D] float32
    "b_k",  # [H', M] float32
    "s_sum",  # [B, Hkv, M, DV] float32: the summary's S
    "z_sum",  # [B, Hkv, M] float32
    "c_big",  # [B, Hkv] float32: the summary's C (0 where nothing is folded)
    "n_kv",  # int scalars
    "n_read",
    "n_anchor",  # read-set entries from n_anchor on are the retrieved T
    "tau",  # float scalars: score scale, sqrt(tau), norm_coef / 2
    "sqrt_tau",
    "half_nc",
]
OUTPUT_NAMES = ["out", "rho", "lse"]  # [B, Hq, DV] OutT, [B, Hq] float32, [B, Hq] float32

SIMD = 32
THREADGROUP_MEMORY = 32768  # bytes every Apple GPU family gives a threadgroup


def threadgroup_floats(group: int, d: int, dv: int, m: int, nsg: int, has_phi: bool) -> int:
    """Float32 words of threadgroup memory the kernel declares (must match the source below)."""
    phi = group * m + group * dv if has_phi else 2
    return group * d + group + nsg * d + 3 * nsg * group + group * dv + phi


def simdgroups_for(group: int, d: int, dv: int, m: int, has_phi: bool) -> int | None:
    """Simdgroups per threadgroup (4, 2 or 1) whose threadgroup memory fits; None if none fits."""
    for nsg in (4, 2, 1):
        if 4 * threadgroup_floats(group, d, dv, m, nsg, has_phi) <= THREADGROUP_MEMORY:
            return nsg
    return None


SOURCE = """
    constexpr int DP = (D + 31) / 32;    // key elements per lane
    constexpr int VP = (DV + 31) / 32;   // value elements per lane
    constexpr float NEG_BIG = -1e30f;    // finite: the kernel never relies on inf arithmetic
    const int lane = int(thread_index_in_simdgroup);
    const int sg = int(simdgroup_index_in_threadgroup);
    const int tid = int(thread_position_in_threadgroup.x);
    const int bh = int(threadgroup_position_in_grid.y);  // b * Hkv + g
    const int b_idx = bh / n_kv;
    const int g_idx = bh % n_kv;
    const int ph = PHI_PER_HEAD ? g_idx : 0;             // feature-map head

    threadgroup float q_s[G * D];                 // tau * q of the group's heads
    threadgroup float cq_s[G];                    // c_q
    threadgroup float key_s[NSG * D];             // x~ of the retrieved key, per simdgroup
    threadgroup float m_s[NSG * G];
    threadgroup float l_s[NSG * G];
    threadgroup float share_s[NSG * G];
    threadgroup float acc_s[G * DV];
    threadgroup float fq_s[HAS_PHI ? G * M : 1];  // f_q
    threadgroup float sub_s[HAS_PHI ? G * DV : 1];  // sum over T of share * v

    const device InT* q_b = q + bh * G * D;
    for (int i = tid; i < G * D; i += NSG * 32) {
        q_s[i] = tau * static_cast<float>(q_b[i]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // query features: l_q = <w_q, x~> + b_q; the norm term only shifts c_q
    if (HAS_PHI) {
        const device float* wq = w_q + ph * M * D;
        const device float* bq = b_q + ph * M;
        for (int t = tid; t < G * M; t += NSG * 32) {
            const int h = t / M;
            const int i = t % M;
            float dot = 0.0f;
            for (int e = 0; e < D; ++e) {
                dot += wq[i * D + e] * q_s[h * D + e];
            }
            fq_s[t] = dot / sqrt_tau + bq[i];  // q_s / sqrt(tau) = x~
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int h = sg; h < G; h += NSG) {
            float top = NEG_BIG;
            for (int i = lane; i < M; i += 32) {
                top = metal::max(top, fq_s[h * M + i]);
            }
            top = simd_max(top);
            float norm = 0.0f;
            for (int e = lane; e < D; e += 32) {
                norm += q_s[h * D + e] * q_s[h * D + e];
            }
            norm = simd_sum(norm) / tau;  // |x~|^2
            for (int i = lane; i < M; i += 32) {
                fq_s[h * M + i] = metal::exp(fq_s[h * M + i] - top);
            }
            if (lane == 0) {
                cq_s[h] = top - half_nc * norm;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    const float c_ref = HAS_PHI ? c_big[bh] : 0.0f;
    // k, v by their strides: mlx-lm hands views of a larger buffer, never copied here (int64 offsets)
    const device InT* k_h = k + b_idx * k_strides[0] + g_idx * k_strides[1];
    const device InT* v_h = v + b_idx * v_strides[0] + g_idx * v_strides[1];
    const device int32_t* idx = read_idx + bh * n_read;

    float m_i[G];
    float l_i[G];
    float shr[G];
    float acc[G][VP];
    float sub[G][VP];
    for (int h = 0; h < G; ++h) {
        m_i[h] = NEG_BIG;
        l_i[h] = 0.0f;
        shr[h] = 0.0f;
        for (int t = 0; t < VP; ++t) {
            acc[h][t] = 0.0f;
            sub[h][t] = 0.0f;
        }
    }

    // every NSG-th read-set entry; j is the same on all lanes, so branches stay uniform
    for (int r = sg; r < n_read; r += NSG) {
        const int j = idx[r];
        if (j < 0) {
            continue;
        }
        float kr[DP];
        float vr[VP];
        for (int t = 0; t < DP; ++t) {
            const int e = lane + 32 * t;
            kr[t] = e < D ? static_cast<float>(k_h[j * k_strides[2] + e * k_strides[3]]) : 0.0f;
        }
        for (int t = 0; t < VP; ++t) {
            const int e = lane + 32 * t;
            vr[t] = e < DV ? static_cast<float>(v_h[j * v_strides[2] + e * v_strides[3]]) : 0.0f;
        }
        for (int h = 0; h < G; ++h) {
            float s = 0.0f;
            for (int t = 0; t < DP; ++t) {
                const int e = lane + 32 * t;
                s += e < D ? q_s[h * D + e] * kr[t] : 0.0f;
            }
            s = simd_sum(s);
            const float m_new = metal::max(m_i[h], s);
            const float alpha = metal::exp(m_i[h] - m_new);
            const float p = metal::exp(s - m_new);
            l_i[h] = l_i[h] * alpha + p;
            for (int t = 0; t < VP; ++t) {
                acc[h][t] = acc[h][t] * alpha + p * vr[t];
            }
            m_i[h] = m_new;
        }
        if (HAS_PHI && r >= n_anchor) {
            // retrieved: subtract its share as folded into S, z, e_i = exp(l_k,i - C)
            float norm = 0.0f;
            for (int t = 0; t < DP; ++t) {
                const int e = lane + 32 * t;
                if (e < D) {
                    const float x = sqrt_tau * kr[t];
                    key_s[sg * D + e] = x;
                    norm += x * x;
                }
            }
            norm = simd_sum(norm);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            const device float* wk = w_k + ph * M * D;
            const device float* bk = b_k + ph * M;
            float part[G];
            for (int h = 0; h < G; ++h) {
                part[h] = 0.0f;
            }
            for (int i = lane; i < M; i += 32) {
                float logit = bk[i] - half_nc * norm;
                for (int e = 0; e < D; ++e) {
                    logit += wk[i * D + e] * key_s[sg * D + e];
                }
                const float w = metal::exp(logit - c_ref);
                for (int h = 0; h < G; ++h) {
                    part[h] += fq_s[h * M + i] * w;
                }
            }
            for (int h = 0; h < G; ++h) {
                const float share = simd_sum(part[h]);
                shr[h] += share;
                for (int t = 0; t < VP; ++t) {
                    sub[h][t] += share * vr[t];
                }
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);  // key_s is rewritten by the next entry
        }
    }

    // merge the simdgroups: rescale each to the common running max, then sum
    if (lane == 0) {
        for (int h = 0; h < G; ++h) {
            m_s[sg * G + h] = m_i[h];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int h = 0; h < G; ++h) {
        float m_all = NEG_BIG;
        for (int s = 0; s < NSG; ++s) {
            m_all = metal::max(m_all, m_s[s * G + h]);
        }
        const float scale = metal::exp(m_i[h] - m_all);
        l_i[h] *= scale;
        for (int t = 0; t < VP; ++t) {
            acc[h][t] *= scale;
        }
    }
    if (lane == 0) {
        for (int h = 0; h < G; ++h) {
            l_s[sg * G + h] = l_i[h];
            share_s[sg * G + h] = shr[h];
        }
    }
    for (int s = 0; s < NSG; ++s) {  // one simdgroup at a time adds its partial sums
        if (sg == s) {
            for (int h = 0; h < G; ++h) {
                for (int t = 0; t < VP; ++t) {
                    const int e = lane + 32 * t;
                    if (e < DV) {
                        acc_s[h * DV + e] = (s == 0 ? 0.0f : acc_s[h * DV + e]) + acc[h][t];
                        if (HAS_PHI) {
                            sub_s[h * DV + e] = (s == 0 ? 0.0f : sub_s[h * DV + e]) + sub[h][t];
                        }
                    }
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // completion and the one normalization, a simdgroup per query head
    for (int h = sg; h < G; h += NSG) {
        float m_ex = NEG_BIG;
        float l_tot = 0.0f;
        float shr_tot = 0.0f;
        for (int s = 0; s < NSG; ++s) {
            m_ex = metal::max(m_ex, m_s[s * G + h]);
            l_tot += l_s[s * G + h];
            shr_tot += share_s[s * G + h];
        }
        float m_star = m_ex;
        float w_phi = 0.0f;   // exp(lam - m*) * d_phi
        float inv_d = 0.0f;
        float n_phi[VP];
        for (int t = 0; t < VP; ++t) {
            n_phi[t] = 0.0f;
        }
        if (HAS_PHI) {
            const device float* s_h = s_sum + size_t(bh) * M * DV;
            const device float* z_h = z_sum + bh * M;
            float fz = 0.0f;
            for (int i = lane; i < M; i += 32) {
                fz += fq_s[h * M + i] * z_h[i];
            }
            const float d_phi = simd_sum(fz) - shr_tot;
            if (d_phi > 0.0f) {  // never negative mass
                for (int t = 0; t < VP; ++t) {
                    const int e = lane + 32 * t;
                    if (e < DV) {
                        float fs = 0.0f;
                        for (int i = 0; i < M; ++i) {
                            fs += fq_s[h * M + i] * s_h[i * DV + e];
                        }
                        n_phi[t] = fs - sub_s[h * DV + e];
                    }
                }
                const float phi_log = cq_s[h] + c_ref + metal::log(d_phi);
                m_star = metal::max(m_ex, phi_log);
                w_phi = metal::exp(phi_log - m_star);
                inv_d = 1.0f / d_phi;
            }
        }
        const float a = metal::exp(m_ex - m_star);
        const float den = a * l_tot + w_phi;
        for (int t = 0; t < VP; ++t) {
            const int e = lane + 32 * t;
            if (e < DV) {
                const float num = a * acc_s[h * DV + e] + w_phi * inv_d * n_phi[t];
                out[(bh * G + h) * DV + e] = static_cast<OutT>(num / den);
            }
        }
        if (lane == 0) {
            rho[bh * G + h] = w_phi / den;
            lse[bh * G + h] = m_star + metal::log(den);
        }
    }
"""


@functools.cache
def decode_kernel():
    """The kernel object, built once per process; Metal compiles each template instantiation on first call.

    ``ensure_row_contiguous=False`` keeps MLX from copying the KV cache every step: k and v are
    read through their strides, and the launcher makes every other input contiguous.
    """
    return mx.fast.metal_kernel(
        name="topkphi_decode",
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        source=SOURCE,
        ensure_row_contiguous=False,
    )
