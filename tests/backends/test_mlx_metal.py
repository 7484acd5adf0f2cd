"""The Metal decode's launcher, its merge with estimates made in MLX ops, and its kernel source.

On Linux nothing here runs Metal: the kernel source is compiled as C++ under a thread emulation
of Metal's execution model (``_emulate``); only ``test_metal_kernel_matches_oracle`` runs the
kernel itself, and it needs an Apple GPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' on Linux)")

import topkphi  # noqa: E402
from tests.backends.test_mlx_backend import (  # noqa: E402
    DTYPES,
    MLX,
    ORACLE,
    TOL,
    case_of,
    decode_both,
    mlx_summary,
    oracle_summary,
    to_mlx,
)
from tests.cases import rel_err  # noqa: E402
from topkphi.backends import mlx_backend, mlx_metal, mlx_ops  # noqa: E402
from topkphi.kernels import metal_decode  # noqa: E402

HAS_METAL = mx.metal.is_available()
NO_METAL = "Metal is not available on this machine (Linux/CPU): the Metal kernel could not be run"
# rows the kernel completes itself (prf, learned), reads exactly only, or merges with an MLX estimate
KERNEL_ROWS = ["gqa3-exact-prf", "gqa4-exact-learned", "topk-only-page", "gqa3-exact-cluster",
               "gqa4-compact-compact", "gqa2-compact-cluster"]


def kernel_call(case, q, k, v):
    """``(plan, extra, reads)`` of the Metal path for one decode step of ``case``."""
    summary = mlx_summary(case, k, v)
    cfg = case.cfg
    n_kv, d = k.shape[1], k.shape[3]
    plan = topkphi.plan_step(cfg, summary, k.shape[2], d, v.shape[3])
    tau = cfg.tau(d)
    reads = MLX.read_set(q, k, summary, plan, cfg, tau)
    est = MLX.estimator_ops(cfg) if plan.estimator is not None else None
    in_kernel = mlx_backend.kernel_phi(est, summary, cfg, d, n_kv)
    extra = None
    if est is not None and in_kernel is None:
        q_g = mlx_ops.f32(q).reshape(q.shape[0], n_kv, -1, d)
        k_read, v_read = mlx_ops.gather_rows(k, reads.idx), mlx_ops.gather_rows(v, reads.idx)
        extra = mlx_backend.estimate_state(q_g, k_read, v_read, reads, est, summary, cfg, tau)
    out_dtype = mx.float32 if extra is not None else None
    return mlx_metal.metal_plan(q, k, v, reads, tau, in_kernel, out_dtype), extra, reads


@pytest.mark.parametrize("name", KERNEL_ROWS)
def test_metal_launch_plan(name):
    case, q, k, v = to_mlx(case_of(name), "bfloat16")
    plan, extra, reads = kernel_call(case, q, k, v)
    batch, n_q, d = q.shape
    n_kv, dv = k.shape[1], v.shape[3]
    t = dict(plan.template)
    in_kernel = case.cfg.estimator == "feature_map"
    assert (t["InT"], t["G"], t["D"], t["DV"], t["HAS_PHI"]) == (mx.bfloat16, n_q // n_kv, d, dv, in_kernel)
    assert (extra is not None) == (case.cfg.estimator in ("cluster", "compact"))
    assert t["OutT"] == (mx.float32 if extra is not None else mx.bfloat16)  # a merge follows in float32
    assert t["PHI_PER_HEAD"] == name.endswith("learned")  # learned maps here have one map per KV head
    assert plan.grid == (32 * t["NSG"], batch * n_kv, 1) and plan.threadgroup == (32 * t["NSG"], 1, 1)
    assert plan.output_shapes == [(batch, n_q, dv), (batch, n_q), (batch, n_q)]
    assert plan.output_dtypes == [t["OutT"], mx.float32, mx.float32]
    assert len(plan.inputs) == len(metal_decode.INPUT_NAMES)
    named = dict(zip(metal_decode.INPUT_NAMES, plan.inputs))
    assert named["read_idx"].dtype == mx.int32 and named["read_idx"].shape == reads.idx.shape
    assert named["n_read"] == reads.idx.shape[2] and named["n_anchor"] == reads.n_anchor
    assert named["k"] is k and named["v"] is v  # the cache goes in uncopied
    if in_kernel:
        m = t["M"]
        assert named["w_q"].shape[1:] == (m, d) and named["s_sum"].shape == (batch, n_kv, m, dv)
        assert all(named[n].dtype == mx.float32 for n in ("w_q", "b_q", "w_k", "b_k", "s_sum", "z_sum", "c_big"))
    assert 4 * metal_decode.threadgroup_floats(t["G"], d, dv, t["M"], t["NSG"], in_kernel) <= 32768
    assert callable(metal_decode.decode_kernel())  # building the kernel object runs anywhere; calling needs Metal


def test_metal_plan_refuses_what_does_not_fit():
    assert metal_decode.simdgroups_for(16, 256, 256, 512, True) is None
    assert metal_decode.simdgroups_for(8, 128, 128, 128, True) == 4
    q, k = mx.zeros((1, 32, 256)), mx.zeros((1, 2, 10, 256))
    assert not mlx_metal.metal_supported(q, k, k, 512, True)
    assert not mlx_metal.metal_supported(q.astype(mx.float16), k, k, 16, True)


@pytest.mark.parametrize("name", ["gqa3-exact-cluster", "gqa4-compact-compact", "gqa2-compact-cluster"])
def test_a_kernel_state_merges_with_an_outside_estimate(name):
    """``finish`` after an exact-only result (here from MLX ops, as the kernel would give it) equals
    the whole pure-MLX step: the normalized ``(out, lse)`` is a complete attention state."""
    case, q, k, v = to_mlx(case_of(name), "float32")
    _, extra, reads = kernel_call(case, q, k, v)
    summary = mlx_summary(case, k, v)
    exact = MLX.attend(q, k, v, reads, None, summary, case.cfg, case.cfg.tau(q.shape[2]))
    out, rho, lse = mlx_metal.finish(*exact, extra, mx.float32)
    full = MLX.attend(q, k, v, reads, MLX.estimator_ops(case.cfg), summary, case.cfg, case.cfg.tau(q.shape[2]))
    for ours, want in zip((out, rho, lse), full):
        np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-5, atol=1e-6)
    assert float(rho.max().item()) > 0.01  # the estimate carries mass


@pytest.mark.skipif(not (HAS_METAL and mx.default_device() == mx.gpu), reason=NO_METAL)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", [*KERNEL_ROWS, "gqa8-page-learned", "topk-only-exact", "batch2-page-small-pages",
                                  "large-scores", "long-2k"])
def test_metal_kernel_matches_oracle(name, dtype):
    case, q, k, v = to_mlx(case_of(name), dtype)
    in_kernel = mlx_backend.kernel_phi(MLX.estimator_ops(case.cfg), mlx_summary(case, k, v), case.cfg, q.shape[2],
                                       k.shape[1])
    assert mlx_backend.use_metal(q, k, v, in_kernel.params if in_kernel is not None else None)
    out, stats, ref, ref_stats = decode_both(case, q, k, v)
    out = np.array(out.astype(mx.float32))
    assert np.all(np.isfinite(out)) and rel_err(out, ref) <= TOL[dtype]
    np.testing.assert_allclose(np.array(stats.rho), ref_stats.rho, atol=TOL[dtype])
    np.testing.assert_allclose(np.array(stats.lse), ref_stats.lse, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.skipif(HAS_METAL or shutil.which("g++") is None, reason="runs where Metal is absent and g++ exists")
@pytest.mark.parametrize("name", [*KERNEL_ROWS, "large-scores"])
def test_metal_source_logic_under_cpu_emulation(name, tmp_path_factory):
    """Not a Metal run: the kernel body compiled as C++20, one std::thread per Metal thread."""
    case, q, k, v = to_mlx(case_of(name), "float32")
    plan, extra, reads = kernel_call(case, q, k, v)
    # the cache as mlx-lm holds it: the first N rows of a larger buffer, here also head-major swapped
    views = {}
    for n, x in (("k", case.k), ("v", case.v)):
        buffer = np.zeros((x.shape[0], x.shape[2] + 29, x.shape[1], x.shape[3]), np.float32)
        buffer[:, : x.shape[2]] = x.transpose(0, 2, 1, 3)
        views[n] = buffer[:, : x.shape[2]].transpose(0, 2, 1, 3)
    kernel_out = _emulate(plan, tmp_path_factory.getbasetemp(), views)
    out, rho, lse = mlx_metal.finish(*(mx.array(x) for x in kernel_out), extra, mx.float32)
    ref, ref_stats = ORACLE.decode(case.q, case.k, case.v, oracle_summary(case), case.cfg,
                                   selected=np.array(reads.selected))
    assert rel_err(np.array(out), ref) <= 1e-4
    np.testing.assert_allclose(np.array(rho), ref_stats.rho, atol=1e-4)
    np.testing.assert_allclose(np.array(lse), ref_stats.lse, rtol=1e-5)


# A CPU stand-in for Metal's execution model, enough for this kernel: threadgroups run one after
# another, each Metal thread is a std::thread, `threadgroup` arrays become function statics,
# simd_sum/simd_max and the barriers are std::barrier rendezvous. It checks the kernel's
# arithmetic, indexing and barrier structure, not Metal compilation or performance.
_EMU_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
struct uint3 { unsigned x, y, z; };
namespace emu {
thread_local unsigned lane, sgi, tid;
thread_local uint3 tg;
thread_local std::barrier<>* sgb;
thread_local std::barrier<>* tgb;
thread_local float* sgbuf;
}
#define thread_index_in_simdgroup emu::lane
#define simdgroup_index_in_threadgroup emu::sgi
#define thread_position_in_threadgroup (uint3{emu::tid, 0u, 0u})
#define threadgroup_position_in_grid emu::tg
#define device
#define constant
#define threadgroup static
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { emu::tgb->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { emu::sgb->arrive_and_wait(); }
inline float simd_reduce(float x, bool take_max) {
  emu::sgbuf[emu::lane] = x;
  emu::sgb->arrive_and_wait();
  float r = emu::sgbuf[0];
  for (int i = 1; i < 32; ++i) r = take_max ? (r > emu::sgbuf[i] ? r : emu::sgbuf[i]) : r + emu::sgbuf[i];
  emu::sgb->arrive_and_wait();
  return r;
}
inline float simd_sum(float x) { return simd_reduce(x, false); }
inline float simd_max(float x) { return simd_reduce(x, true); }
namespace metal { using std::exp; using std::log; inline float max(float a, float b) { return a > b ? a : b; } }
"""
_INTS = {"n_kv", "n_read", "n_anchor"}
_FLOATS = {"tau", "sqrt_tau", "half_nc"}
_INT_ARRAYS = {"read_idx"}
_CACHE = {"q", "k", "v"}
_TEMPLATE = ("G", "D", "DV", "M", "NSG", "HAS_PHI", "PHI_PER_HEAD")


def _emulate(plan, workdir, views=None):
    """Run a float32 ``MetalPlan`` through the kernel source compiled as C++: ``(out, rho, lse)`` NumPy.

    ``views`` may give k and v as strided float32 NumPy views, read through their strides as on Metal.
    """
    import ctypes
    import subprocess

    names, t = metal_decode.INPUT_NAMES, dict(plan.template)
    assert t["InT"] == t["OutT"] == mx.float32, "the emulation runs float32 plans"
    nsg = t["NSG"]

    def ctype(n):
        return "int" if n in _INTS else "float" if n in _FLOATS else "const void*"

    def param(n):
        if n in _INTS | _FLOATS:
            return f"const constant {ctype(n)}& {n}"
        typ = "int32_t" if n in _INT_ARRAYS else "InT" if n in _CACHE else "float"
        strides = f", const constant int64_t* {n}_strides" if n in ("k", "v") else ""  # as MLX adds them
        return f"const device {typ}* {n}{strides}"

    def arg(n):
        if n in _INTS | _FLOATS:
            return f"a_{n}"
        strides = f", (const int64_t*)s_{n}" if n in ("k", "v") else ""
        return f"(const {'int32_t' if n in _INT_ARRAYS else 'float'}*)a_{n}{strides}"

    inst = ", ".join(str(t[x]).lower() for x in _TEMPLATE)
    src = _EMU_PRELUDE + f"""
template <typename InT, typename OutT, int G, int D, int DV, int M, int NSG, bool HAS_PHI, bool PHI_PER_HEAD>
void body({", ".join(param(n) for n in names)}, device OutT* out, device float* rho, device float* lse) {{
{metal_decode.SOURCE}
}}
extern "C" void run({", ".join(f"{ctype(n)} a_{n}" for n in names)}, const void* s_k, const void* s_v,
                    float* out, float* rho, float* lse, int n_groups) {{
  for (int g = 0; g < n_groups; ++g) {{
    std::barrier<> tgb({nsg * 32});
    std::vector<std::unique_ptr<std::barrier<>>> sgbs;
    for (int s = 0; s < {nsg}; ++s) sgbs.emplace_back(new std::barrier<>(32));
    std::vector<float> buf({nsg * 32});
    std::vector<std::thread> threads;
    for (int t = 0; t < {nsg * 32}; ++t) {{
      threads.emplace_back([&, t] {{
        emu::lane = t % 32; emu::sgi = t / 32; emu::tid = t; emu::tg = uint3{{0u, unsigned(g), 0u}};
        emu::sgb = sgbs[t / 32].get(); emu::tgb = &tgb; emu::sgbuf = buf.data() + (t / 32) * 32;
        body<float, float, {inst}>({", ".join(arg(n) for n in names)}, out, rho, lse);
      }});
    }}
    for (auto& th : threads) th.join();
  }}
}}
"""
    cpp, lib = workdir / f"emu_{abs(hash(src))}.cpp", workdir / f"emu_{abs(hash(src))}.so"
    cpp.write_text(src)
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(cpp), "-o", str(lib)],
                   check=True, capture_output=True)
    views = views or {}
    keep, args, strides = [], [], []
    for n, x in zip(names, plan.inputs):
        if n in _INTS | _FLOATS:
            args.append(ctypes.c_int(int(x)) if n in _INTS else ctypes.c_float(float(x)))
            continue
        a = views.get(n)
        if a is None:
            a = np.ascontiguousarray(np.array(x), dtype=np.int32 if n in _INT_ARRAYS else np.float32)
        keep.append(a)
        args.append(a.ctypes.data_as(ctypes.c_void_p))
        if n in ("k", "v"):
            keep.append(np.array(a.strides, dtype=np.int64) // a.itemsize)
            strides.append(keep[-1].ctypes.data_as(ctypes.c_void_p))
    outputs = [np.zeros(shape, np.float32) for shape in plan.output_shapes]
    ctypes.CDLL(str(lib)).run(*args, *strides, *(o.ctypes.data_as(ctypes.c_void_p) for o in outputs),
                              ctypes.c_int(plan.grid[1]))
    return outputs
