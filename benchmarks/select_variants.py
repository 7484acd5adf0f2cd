"""Variants of the page-selection kernels on the GPU: the bound kernel's form (elementwise fp32 or two
tensor-core products), tile and warps, and the threshold kernel's warps. Bound variants report their largest
difference from the elementwise bound (scaled by its largest value) and check their sub-block maxima;
selections are checked against the torch backend's page selection (the same read index), which is timed
too. Timed as CUDA-graph replays.

    python benchmarks/select_variants.py [--n 131072 524288] [--top-k 256 2048] [--all-bounds]
    TRITON_INTERPRET=1 python benchmarks/select_variants.py --n 3000 --top-k 64 --reps 1   # CPU smoke run

B=1, Hq=32, Hkv=8, d=128, bf16, page size 16, sink 4 + tail 64 (Llama-3-8B decode shapes).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import topkphi
from topkphi.backends.torch_backend import TorchBackend
from topkphi.step import plan_step
from topkphi.triton.select import SUB_BLOCK, page_bounds, page_read_set

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_attention import DEVICE, DTYPE, device_name, hbm_copy_gbs, timed_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--top-k", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--all-bounds", action="store_true", help="time every bound tiling, not only the defaults")
    args = parser.parse_args()
    B, Hq, Hkv, d, page = 1, 32, 8, 128, 16
    copy = hbm_copy_gbs()
    print(f"{device_name()}  HBM copy {copy:.0f} GB/s")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    twin = TorchBackend()
    rows = []
    for n in args.n:
        k = torch.randn(B, Hkv, n, d, device=DEVICE, dtype=DTYPE, generator=gen)
        q = torch.randn(B, Hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
        cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=256, selection="page", page_size=page, feature_map=None)
        summary = twin.build_summary(k, k, cfg)
        tau = cfg.tau(d)
        kmin, kmax = summary.pages.kmin, summary.pages.kmax
        meta_bytes = 2 * kmin.numel() * kmin.element_size()
        ref_u = page_bounds(q, kmin, kmax, tau, sub_block=SUB_BLOCK, use_dot=False)
        # (block_p, warps, blocks per program, stages, tensor-core form); the elementwise default first
        # (None: the default tiling of that form, bound_tiling)
        variants = [(None, None, None, None, False), (None, None, None, None, True)]
        if args.all_bounds:  # the tilings measured for bound_tiling (docs/BENCHMARKS.md)
            variants += [(bp, w, 1, 1, True) for bp in (64, 128) for w in (4, 8)]
            variants += [(bp, 4, per, 2, True) for bp in (64, 128) for per in (2, 4)]
        for block_p, warps, per, stages, use_dot in variants:
            fn = functools.partial(page_bounds, q, kmin, kmax, tau, block_p=block_p,
                                   sub_block=SUB_BLOCK, num_warps=warps, blocks_per_program=per, num_stages=stages,
                                   use_dot=use_dot)
            try:
                u, bm = fn()
            except Exception as err:  # a tile the compiler rejects: report it, keep going
                print(f"  {block_p=} {warps=} {per=} {use_dot=}: {type(err).__name__}: {str(err)[:200]}")
                continue
            n_sb = -(-summary.n_pages // SUB_BLOCK)
            # the tensor-core form sums in another order: report its largest difference, scaled
            diff = ((u - ref_u[0]).abs().max() / ref_u[0].abs().max()).item()
            padded = u.new_full((*u.shape[:2], n_sb * SUB_BLOCK), float("-inf"))
            padded[..., : u.shape[-1]] = u
            same_bm = torch.equal(bm[..., :n_sb], padded.view(*u.shape[:2], n_sb, SUB_BLOCK).amax(-1))
            ms = timed_ms(fn, args.reps)
            form = "dot" if use_dot else "elem"
            tiling = "default" if block_p is None else f"bp={block_p} w={warps} per={per} st={stages}"
            rows.append((n, "bound", f"{form} {tiling} d={diff:.0e} bm={same_bm}",
                         ms, meta_bytes / ms / 1e6))
            print(rows[-1], flush=True)
        for top_k in args.top_k:
            case = cfg.replace(top_k=top_k)
            plan = plan_step(case, summary, n, d, d)
            ref = twin.read_set(q, k, summary, plan, case, tau)
            for warps in (4, 8, 16):
                fn = functools.partial(page_read_set, q, summary.pages, summary.first_page, tau, plan.n_take, page,
                                       plan.regions, select_warps=warps)
                same = torch.equal(fn().idx, ref.idx)
                rows.append((n, f"select K={top_k}", f"threshold warps={warps} same={same}", timed_ms(fn, args.reps),
                             None))
                print(rows[-1], flush=True)
            fn = functools.partial(twin.read_set, q, k, summary, plan, case, tau)
            rows.append((n, f"select K={top_k}", "torch backend (topk_ascending)", timed_ms(fn, args.reps), None))
    print(f"\n{'N':>7s} {'stage':>14s} {'variant':>52s} {'us':>7s} {'GB/s':>6s}")
    for n, stage, variant, ms, gbs in rows:
        print(f"{n:>7d} {stage:>14s} {variant:>52s} {1000 * ms:7.1f} {'-' if gbs is None else f'{gbs:6.0f}':>6s}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
