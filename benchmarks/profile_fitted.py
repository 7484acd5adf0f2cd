"""Where the time of the fitted summaries goes on a GPU: the cluster fit at prefill and the step's estimate.

    python benchmarks/profile_fitted.py --n 131072      # torch profiler tables, CUDA time per op
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import topkphi
from topkphi.step import plan_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    B, Hq, Hkv, d, dev, dt = 1, 32, 8, 128, "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = (torch.randn(B, Hkv, args.n, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
    q = torch.randn(B, Hq, d, device=dev, dtype=dt, generator=gen)
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=args.top_k, selection="page", feature_map="cluster")
    queries = topkphi.ReferenceQueries(torch.randn(B, Hq, 256, d, device=dev, dtype=dt, generator=gen), end=args.n)
    be = topkphi.get_backend("triton")
    be.build_summary(k, v, cfg, queries=queries)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        summary = be.build_summary(k, v, cfg, queries=queries)
        torch.cuda.synchronize()
    print(f"cluster fit at {args.n}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    plan = plan_step(cfg, summary, args.n, d, d)
    tau = cfg.tau(d)
    reads = be.read_set(q, k, summary, plan, cfg, tau)
    ops = be.estimator_ops(cfg)
    for _ in range(3):
        be.attend(q, k, v, reads, ops, summary, cfg, tau)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            be.attend(q, k, v, reads, ops, summary, cfg, tau)
        torch.cuda.synchronize()
    print(f"attend with the cluster estimate at {args.n}, 10 calls:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
