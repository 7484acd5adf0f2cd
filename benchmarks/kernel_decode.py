"""GPU check and timing of the fused Triton decode kernel (indices given).

B=1, Hq=32, Hkv=8, d=128, bf16; read set = 4 sink + 64 tail + K retrieved mid tokens
(pages of 16 consecutive positions, as page selection gives); PRF phi with m=64.
Checks against a float32 torch reference on the GPU, then times each variant with CUDA events
(median, L2 flushed before each call): eager launches and CUDA-graph replays; prints a table last.
Register counts come from recording the launcher's compiled kernels here, not from the product.

    python benchmarks/kernel_decode.py [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/kernel_decode.py --ns 600 --ks 64 --reps 1   # CPU smoke run (fp32)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import topkphi.triton.decode as decode_launcher  # noqa: E402
from topkphi.triton.decode import FeatureMapInputs, fused_decode  # noqa: E402

B, HQ, HKV, D, M, P = 1, 32, 8, 128, 64, 16
N_SINK, N_TAIL = 4, 64
dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, a check that it runs
DT = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's 16-bit dots are unreliable


class LaunchRecorder:
    """Stands in for a JIT kernel in the launcher's module and keeps what each launch compiled."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiled.append(self.kernel[grid](*args, **kwargs))
            return self.compiled[-1]

        return launch


def registers_and_spills(fn) -> list[tuple[int, int]] | None:
    """(registers, spills) of the kernels one call of ``fn`` launches; None where Triton does not say."""
    kernels = {name: getattr(decode_launcher, name) for name in ("decode_kernel", "merge_kernel")}
    recorders = {name: LaunchRecorder(kernel) for name, kernel in kernels.items()}
    for name, recorder in recorders.items():
        setattr(decode_launcher, name, recorder)
    try:
        fn()
    finally:
        for name, kernel in kernels.items():
            setattr(decode_launcher, name, kernel)
    compiled = [c for name in kernels for c in recorders[name].compiled]
    try:
        return [(c.n_regs, c.n_spills) for c in compiled]
    except AttributeError:  # the interpreter compiles nothing
        return None


def hbm_copy_bandwidth() -> float:
    if dev != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = do_bench(functools.partial(y.copy_, x), warmup=50, rep=400, return_mode="median")
    del x, y
    return 2 * 2**30 / (t * 1e-3)  # bytes read + written per second


def make_inputs(N: int, K: int, gen: torch.Generator):
    q = torch.randn(B, HQ, D, device=dev, dtype=DT, generator=gen)
    k = torch.randn(B, HKV, N, D, device=dev, dtype=DT, generator=gen)
    v = torch.randn(B, HKV, N, D, device=dev, dtype=DT, generator=gen)
    first_page, last_page = math.ceil(N_SINK / P), (N - N_TAIL) // P  # pages wholly inside mid
    rows = []
    for _ in range(B * HKV):
        pages = torch.randperm(last_page - first_page, device=dev, generator=gen)[: K // P] + first_page
        t = (pages.sort().values[:, None] * P + torch.arange(P, device=dev)).flatten()
        rows.append(torch.cat([torch.arange(N_SINK, device=dev), torch.arange(N - N_TAIL, N, device=dev), t]))
    idx = torch.stack(rows).view(B, HKV, -1).to(torch.int32)
    n_read = torch.full((B, HKV), idx.shape[-1], dtype=torch.int32, device=dev)
    # PRF summary over mid, built in fp32 (SPEC section 4)
    omega = torch.randn(1, M, D, device=dev, generator=gen)
    bias = torch.full((1, M), -0.5 * math.log(M), device=dev)
    scale = D**-0.5
    S = torch.zeros(B, HKV, M, D, device=dev)
    z = torch.zeros(B, HKV, M, device=dev)
    c = torch.zeros(B, HKV, device=dev)
    for g in range(HKV):
        km = k[0, g, N_SINK : N - N_TAIL].float() * scale**0.5
        lk = km @ omega[0].T + bias[0] - 0.5 * (km * km).sum(-1, keepdim=True)
        c[0, g] = lk.max()
        e = torch.exp(lk - c[0, g])
        S[0, g], z[0, g] = e.T @ v[0, g, N_SINK : N - N_TAIL].float(), e.sum(0)
        del km, lk, e
    # w_k in the cache dtype halves its reads (the kernel runs l_k in bf16 either way)
    phi = FeatureMapInputs(omega, bias, omega.to(DT), bias.clone(), 1.0, S, z, c, N_SINK + N_TAIL)
    return q, k, v, idx, n_read, phi


def reference(q, k, v, idx, phi, scale):
    """SPEC section 5 in float32 torch on the gathered read set (all entries valid)."""
    G = HQ // HKV
    gi = idx.long()[..., None]
    ks = torch.gather(k, 2, gi.expand(-1, -1, -1, D)).float()  # [B,Hkv,R,d]
    vs = torch.gather(v, 2, gi.expand(-1, -1, -1, D)).float()
    qg = q.float().view(B, HKV, G, D)
    s = scale * qg @ ks.transpose(-1, -2)  # [B,Hkv,G,R]
    if phi is None:
        p = torch.softmax(s, -1)
        return (p @ vs).view(B, HQ, D), torch.zeros(B, HQ, device=dev)
    st = scale**0.5
    lq = st * qg @ phi.w_q[0].T + phi.b_q[0] - 0.5 * phi.norm_coef * (st * qg).square().sum(-1, keepdim=True)
    cq = lq.amax(-1, keepdim=True)
    f = torch.exp(lq - cq)
    lam = cq[..., 0] + phi.c_max[..., None]  # [B,Hkv,G]
    lk = st * ks @ phi.w_k[0].float().T + phi.b_k[0] - 0.5 * phi.norm_coef * (st * ks).square().sum(-1, keepdim=True)
    e = torch.exp(lk - phi.c_max[..., None, None])
    e[:, :, : N_SINK + N_TAIL] = 0  # anchors are not in mid
    w = f @ e.transpose(-1, -2)  # [B,Hkv,G,R]
    n_phi = f @ phi.s - w @ vs
    d_phi = f @ phi.z[..., None] - w.sum(-1, keepdim=True)
    ok = d_phi > 0
    n_phi, d_phi = torch.where(ok, n_phi, 0.0), torch.where(ok, d_phi, 0.0)
    log_d = torch.where(ok, lam[..., None] + torch.log(d_phi.clamp_min(1e-30)), -torch.inf)
    m_star = torch.maximum(s.amax(-1, keepdim=True), log_d)
    p = torch.exp(s - m_star)
    a = torch.where(ok, torch.exp(lam[..., None] - m_star), 0.0)
    num = p @ vs + a * n_phi
    den = p.sum(-1, keepdim=True) + a * d_phi
    return (num / den).view(B, HQ, D), (a * d_phi / den).view(B, HQ)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


_FLUSH = None


def time_events(fn, reps=60):
    """Median GPU time (ms) of fn between two events, L2 flushed by a 1 GiB write before each call.

    The flush keeps the GPU busy long enough that the host has queued all of fn's launches,
    so this is device time (kernels + the gaps between them), not Python launch overhead.
    """
    global _FLUSH
    if dev != "cuda":  # host time of the interpreter
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return sorted(times)[reps // 2]
    if _FLUSH is None:
        _FLUSH = torch.empty(2**28, dtype=torch.int32, device=dev)
    for _ in range(3):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        _FLUSH.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2]


def time_graph(fn, reps=60):
    """As time_events, replaying fn captured in a CUDA graph (how a serving loop runs a decode step)."""
    if dev != "cuda":
        return float("nan")
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_events(g.replay, reps)


def time_host(fn, reps=50):
    """Host-side microseconds per eager call (launcher + Triton launch), GPU not waited for."""
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / reps * 1e6


def profile_kernels(q, k, v, idx, n_read, phi, scale, log):
    """Per-kernel device time (torch profiler) of the default split."""
    from torch.profiler import ProfilerActivity, profile

    time_events(lambda: None, reps=3)  # allocates the flush buffer
    for use_phi in (True, False):
        fn = functools.partial(fused_decode, q, k, v, idx, n_read, scale=scale, feature_map=phi if use_phi else None)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                _FLUSH.zero_()
                fn()
            torch.cuda.synchronize()
        rows = [
            (e.key[:40], e.device_time_total / max(e.count, 1), e.count)
            for e in prof.key_averages()
            if "kernel" in e.key and "elementwise" not in e.key and "vectorized" not in e.key
        ]
        line = f"profile K=2048 phi={use_phi}: " + ", ".join(f"{name} {t:.1f} us x{c}" for name, t, c in rows)
        log.setdefault("profile", []).append(line)
        print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ns", default="32768,131072,524288")
    ap.add_argument("--ks", default="256,1024,2048")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--ncu", action="store_true", help="two calls only (phi on, off), for Nsight Compute")
    args = ap.parse_args()
    if args.ncu:
        q, k, v, idx, n_read, phi = make_inputs(131072, 2048, torch.Generator(device=dev).manual_seed(0))
        for ph in (phi, None):
            fused_decode(q, k, v, idx, n_read, scale=D**-0.5, feature_map=ph)
        torch.cuda.synchronize()
        return
    log = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": [],
    }
    n_sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    bw = hbm_copy_bandwidth()
    log["hbm_copy_GBps"] = bw / 1e9
    print(
        f"{log['device']} ({n_sms} SMs), torch {torch.__version__}, triton {triton.__version__}; "
        f"d2d copy {bw / 1e9:.0f} GB/s (read+write)",
        flush=True,
    )
    scale = D**-0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    configs = [dict(block_n=bn, split=bn * t, num_warps=w) for bn in (32, 64) for t in (1, 2, 4) for w in (4, 8)]
    configs += [
        dict(block_n=16, split=32, num_warps=4),
        dict(block_n=16, split=16, num_warps=2),
        dict(block_n=64, split=1 << 20, num_warps=4),  # one program per KV head, no merge
    ]
    configs += [dict(phi_dot16=False), dict(phi_dot16=False, block_n=64, split=256)]  # w = f . f_k in tf32
    if dev != "cuda":  # the interpreter: the default and two tilings are enough to show it runs
        configs = configs[:2]
    table = []
    for N in [int(x) for x in args.ns.split(",")]:
        t_sdpa = None
        for K in [int(x) for x in args.ks.split(",")]:
            q, k, v, idx, n_read, phi = make_inputs(N, K, gen)
            if t_sdpa is None:
                t_sdpa = time_events(
                    functools.partial(F.scaled_dot_product_attention, q[:, :, None], k, v, enable_gqa=True), args.reps
                )
            R = idx.shape[-1]
            for use_phi in (True, False):
                ph = phi if use_phi else None
                ref_out, ref_rho = reference(q, k, v, idx, ph, scale)
                out, rho, _ = fused_decode(q, k, v, idx, n_read, scale=scale, feature_map=ph)
                if dev == "cuda":
                    torch.cuda.synchronize()
                err = rel_err(out, ref_out)
                rho_err = (rho - ref_rho).abs().max().item()
                assert torch.isfinite(out).all() and err <= 2e-2 and rho_err <= 2e-2, (N, K, use_phi, err, rho_err)
                kv_bytes = B * HKV * R * 2 * D * 2
                extra = idx.numel() * 4 + n_read.numel() * 4 + q.numel() * 2 + B * HQ * D * 2
                if use_phi:
                    state = (phi.s, phi.z, phi.c_max, phi.w_q, phi.b_q, phi.w_k, phi.b_k)
                    extra += sum(t.numel() * t.element_size() for t in state) + B * HQ * 4
                nbytes = kv_bytes + extra
                times, regs = {}, {}
                for cfg in [None] + configs:
                    kw = {} if cfg is None else cfg
                    fn = functools.partial(fused_decode, q, k, v, idx, n_read, scale=scale, feature_map=ph, **kw)
                    o2 = fn()[0]
                    key = json.dumps(cfg)
                    if rel_err(o2, ref_out) > 2e-2:
                        times[key] = (float("nan"),) * 2
                        continue
                    regs[key] = registers_and_spills(fn)
                    times[key] = (time_events(fn, args.reps), time_graph(fn, args.reps))
                host_us = time_host(functools.partial(fused_decode, q, k, v, idx, n_read, scale=scale, feature_map=ph),
                                    50 if dev == "cuda" else args.reps)
                t_def, g_def = times["null"]
                best_cfg, (_, g_best) = min(((c, t) for c, t in times.items() if c != "null"), key=lambda x: x[1][1])
                row = dict(
                    N=N,
                    K=K,
                    phi=use_phi,
                    read_tokens=R,
                    err=err,
                    rho_err=rho_err,
                    bytes=nbytes,
                    t_default_ms=t_def,
                    g_default_ms=g_def,
                    g_best_ms=g_best,
                    best_cfg=best_cfg,
                    best_regs_spills=regs.get(best_cfg),
                    host_us=host_us,
                    t_sdpa_ms=t_sdpa,
                    all=times,
                )
                log["rows"].append(row)
                table.append(row)
                print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "all"}), flush=True)
                if use_phi:
                    print("  graph us: " + ", ".join(f"{c} {1e3 * t[1]:.1f}" for c, t in times.items()), flush=True)
            if N == 131072 and K == 2048 and dev == "cuda":
                profile_kernels(q, k, v, idx, n_read, phi, scale, log)
            del q, k, v, idx, phi
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "kernel_decode.json").write_text(json.dumps(log, indent=1))
    print(
        f"\n{log['device']}, {log['date']}, HBM d2d copy {bw / 1e9:.0f} GB/s; bf16 B=1 Hq=32 Hkv=8 d=128 m=64; "
        "times in us, GPU time with L2 flushed; ev = eager launches, gr = CUDA graph replay"
    )
    print(
        f"{'N':>7} {'phi':>3} {'read':>5} {'err':>7} {'KB':>5} {'ev def':>6} {'gr def':>6} {'gr best':>7} "
        f"{'GB/s':>5} {'%HBM':>5} {'host':>5} {'sdpa':>6}  best config (graph)"
    )
    for r in table:
        gbs = r["bytes"] / r["g_best_ms"] / 1e6
        print(
            f"{r['N']:>7} {'on' if r['phi'] else 'off':>3} {r['read_tokens']:>5} {r['err']:>7.1e} "
            f"{r['bytes'] / 1024:>5.0f} {r['t_default_ms'] * 1e3:>6.1f} {r['g_default_ms'] * 1e3:>6.1f} "
            f"{r['g_best_ms'] * 1e3:>7.1f} {gbs:>5.0f} {100 * gbs * 1e9 / bw:>5.1f} {r['host_us']:>5.0f} "
            f"{r['t_sdpa_ms'] * 1e3:>6.1f}  {r['best_cfg']}"
        )
    print("command: python benchmarks/kernel_decode.py --out $OUT")


if __name__ == "__main__":
    main()
