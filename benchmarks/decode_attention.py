"""One decode step of attention at Llama-3-8B shapes: dense SDPA vs Top-K only vs Top-K + phi.

    python benchmarks/decode_attention.py            # on a CUDA GPU
    python benchmarks/decode_attention.py --n 4096 16384 --top-k 256 --reps 20
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --n 600 --top-k 64 --reps 1   # CPU smoke run

B=1, Hq=32, Hkv=8, d=128, bf16. The topkphi step is the whole thing: selection (exact scoring, or
page bounds + the threshold select kernel) and the fused Triton decode, timed eagerly and as a replayed CUDA graph (how
serving engines run decode steps). Bytes are what each method must read from HBM. Without a GPU every
number is host time of the interpreter (fp32, no graphs): a check that the code runs, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F

import topkphi
from topkphi.regions import Regions, n_selected_pages, page_span
from topkphi.step import plan_step
from topkphi.summary import complete_pages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter's 16-bit dots are unreliable


def median_ms(fn, reps: int) -> float:
    for _ in range(3 if DEVICE == "cuda" else 1):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graphed(fn):
    """Capture ``fn`` in a CUDA graph; return its replay (None without a GPU or if it cannot be captured)."""
    if DEVICE != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # report, do not hide: the eager number still stands
        print(f"  graph capture failed: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
        return None
    return graph.replay


def hbm_copy_gbs() -> float:
    x = torch.empty((2 * 1024**3 if DEVICE == "cuda" else 2**24) // 2, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), 20)
    return 2 * x.numel() * 2 / ms / 1e6


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"


def step_bytes(cfg: topkphi.Config, n_tokens: int, n_kv: int, d: int, elem: int) -> int:
    """HBM bytes of one step: exact tokens, the summary, and what selection reads."""
    regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
    first, n_pages = page_span(regions.mid_start, regions.mid_end, cfg.page_size)
    if cfg.selection == "exact":
        n_sel, select = min(cfg.top_k, regions.n_mid), regions.n_mid * d * elem
    elif cfg.selection == "compact":  # fp32 compact tokens: kappa and beta to select, nu to estimate
        first, n_pages = complete_pages(regions.mid_start, regions.mid_end, cfg.page_size)
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, n_pages)
        n_sel = regions.n_mid - (n_pages - n_take) * cfg.page_size
        select = n_pages * (d + 1 + (d if cfg.estimator == "compact" else 0)) * 4
    else:
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, n_pages)
        n_sel, select = n_take * cfg.page_size, 2 * n_pages * d * elem
    exact = (regions.n_anchor + n_sel) * 2 * d * elem
    summary = {"feature_map": cfg.n_features * (d + 1) * 4,  # fp32 state
               "cluster": cfg.n_clusters * (2 * d + 2) * 4 + n_sel * 4}.get(cfg.estimator, 0)  # + int32 labels
    return n_kv * (exact + summary + select)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def graph_ms(fn, reps: int):
    replay = graphed(fn)
    return median_ms(replay, reps) if replay else None


def timed_ms(fn, reps: int):
    """A CUDA-graph replay on the GPU; host time of the interpreter elsewhere (so the smoke run calls fn)."""
    return graph_ms(fn, reps) if DEVICE == "cuda" else median_ms(fn, reps)


def page_stages(be, plain, q, k, v, summary, cfg, reps: int):
    """Per-stage page selection times in ms (graph replays unless named eager): (step eager, step,
    bound + sub-block maxima, threshold select, attend, elementwise bound, step with plain launches).
    ``plain`` is the backend built with ``TritonTuning(chain_launches=False)``."""
    from topkphi.triton.select import SUB_BLOCK, page_bounds

    d = q.shape[-1]
    tau = cfg.tau(d)
    plan = plan_step(cfg, summary, k.shape[2], d, v.shape[-1])
    step = functools.partial(be.decode, q, k, v, summary, cfg)
    pages = summary.pages
    bound = functools.partial(page_bounds, q, pages.kmin, pages.kmax, tau, sub_block=SUB_BLOCK)
    select = functools.partial(be.read_set, q, k, summary, plan, cfg, tau)
    reads = select()
    ops = be.estimator_ops(cfg) if plan.estimator is not None else None
    attend = functools.partial(be.attend, q, k, v, reads, ops, summary, cfg, tau)
    bound_elem = functools.partial(page_bounds, q, pages.kmin, pages.kmax, tau, sub_block=SUB_BLOCK, use_dot=False)
    plain_step = functools.partial(plain.decode, q, k, v, summary, cfg)
    return (median_ms(step, reps), timed_ms(step, reps), timed_ms(bound, reps), timed_ms(select, reps),
            timed_ms(attend, reps), timed_ms(bound_elem, reps), timed_ms(plain_step, reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768, 131072, 524288])
    parser.add_argument("--top-k", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--selection", nargs="+", default=["exact", "page"])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--estimators", nargs="+", default=["none", "prf"],
                        help="none, prf, cluster, compact (with --selection compact only); fitted summaries "
                             "are fitted from 256 random reference rows, their fit timed")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the per-stage page-selection table (select vs attend, chained vs plain)")
    parser.add_argument("--ncu", action="store_true",
                        help="run each page step twice, untimed, for Nsight Compute (ncu -k regex:...)")
    args = parser.parse_args()
    B, Hq, Hkv, d, elem = 1, 32, 8, 128, DTYPE.itemsize
    be = topkphi.get_backend(args.backend)
    triton = args.backend == "triton"
    if triton:
        from topkphi.backends.triton_backend import TritonTuning

        plain = topkphi.get_backend("triton", tuning=TritonTuning(chain_launches=False))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if args.ncu:
        for n in args.n:
            k, v = (torch.randn(B, Hkv, n, d, device=DEVICE, dtype=DTYPE, generator=gen) for _ in range(2))
            q = torch.randn(B, Hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
            for top_k in args.top_k:
                cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=top_k, selection="page", page_size=16,
                                     feature_map="prf", n_features=64)
                summary = be.build_summary(k, v, cfg)
                for _ in range(2):
                    be.decode(q, k, v, summary, cfg)
        torch.cuda.synchronize()
        return
    copy_gbs = hbm_copy_gbs()
    print(f"{device_name()}  HBM copy {copy_gbs:.0f} GB/s  backend {args.backend}", flush=True)
    header = (f"{'N':>7s} {'method':>12s} {'sel':>5s} {'top_k':>5s} {'eager ms':>9s} {'graph ms':>9s} "
              f"{'MB read':>8s} {'GB/s':>6s} {'x dense':>7s}")
    rows, stages = [], []
    for n in args.n:
        k = torch.randn(B, Hkv, n, d, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(B, Hkv, n, d, device=DEVICE, dtype=DTYPE, generator=gen)
        q = torch.randn(B, Hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
        dense = functools.partial(F.scaled_dot_product_attention, q[:, :, None], k, v, enable_gqa=True)
        dense_ms = median_ms(dense, args.reps)
        dense_bytes = 2 * B * Hkv * n * d * elem
        rows.append((n, "dense", "-", "-", dense_ms, None, dense_bytes, dense_ms))
        print(f"{n:>7d} {'dense sdpa':>12s} {'-':>5s} {'-':>5s} {dense_ms:9.4f} {'-':>9s} {dense_bytes / 1e6:8.1f} "
              f"{dense_bytes / dense_ms / 1e6:6.0f} {1.0:7.2f}", flush=True)
        for selection in args.selection:
            for top_k in args.top_k:
                for feature_map in (None if e == "none" else e for e in args.estimators):
                    if feature_map == "compact" and selection != "compact":
                        continue  # the compact estimate is the compact selection's tokens
                    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=top_k, selection=selection, page_size=16,
                                         feature_map=feature_map, n_features=64)
                    queries = None
                    if cfg.fitted:
                        ref_rows = torch.randn(B, Hq, cfg.fit_window, d, device=DEVICE, dtype=DTYPE, generator=gen)
                        queries = topkphi.ReferenceQueries(ref_rows, end=n)
                    sync()
                    fit_start = time.perf_counter()
                    summary = be.build_summary(k, v, cfg, queries=queries)
                    sync()
                    if cfg.fitted:
                        fit_ms = 1000 * (time.perf_counter() - fit_start)
                        print(f"  fit {selection}/{feature_map} at {n}: {fit_ms:.1f} ms "
                              "(one layer, first call includes warm-up)", flush=True)
                    step = functools.partial(be.decode, q, k, v, summary, cfg)
                    eager = median_ms(step, args.reps)
                    if triton:  # which primitives ran kernels, and why the others took torch
                        print(f"  path: {be.last_path}", flush=True)
                    replay = graphed(step)
                    graph = median_ms(replay, args.reps) if replay else None
                    best = min(eager, graph) if graph else eager
                    nbytes = step_bytes(cfg, n, Hkv, d, elem)
                    method = f"topk+{feature_map}" if feature_map else "topk only"
                    if selection == "compact":
                        method = f"cmp+{feature_map}" if feature_map else "cmp only"
                    rows.append((n, method, selection, top_k, eager, graph, nbytes, dense_ms))
                    if selection == "page" and triton and not args.no_breakdown:
                        stages.append((n, method, top_k, dense_ms,
                                       *page_stages(be, plain, q, k, v, summary, cfg, args.reps)))
                    print(f"{n:>7d} {method:>12s} {selection:>5s} {top_k:>5d} {eager:9.4f} "
                          f"{'-' if graph is None else f'{graph:9.4f}':>9s} {nbytes / 1e6:8.2f} "
                          f"{nbytes / best / 1e6:6.0f} {dense_ms / best:7.2f}", flush=True)
    print("\n" + header)
    for n, method, sel, top_k, eager, graph, nbytes, dense_ms in rows:
        best = eager if graph is None else min(eager, graph)
        print(f"{n:>7d} {method:>12s} {sel:>5s} {top_k!s:>5s} {eager:9.4f} "
              f"{'-' if graph is None else f'{graph:9.4f}':>9s} {nbytes / 1e6:8.2f} {nbytes / best / 1e6:6.0f} "
              f"{dense_ms / best:7.2f}")
    if stages:
        print("\npage selection per stage, us (g = CUDA-graph replay, e = eager); step = bound with sub-block "
              "maxima + threshold select kernel + fused decode")
        print(f"{'N':>7s} {'method':>10s} {'top_k':>5s} {'dense':>7s} {'step e':>7s} {'step g':>7s} "
              f"{'bound g':>7s} {'select g':>8s} {'attend g':>8s} {'x dense':>7s} {'bnd elem':>8s} {'no pdl':>7s}")
        for n, method, top_k, dense_ms, *t in stages:
            f = lambda x: "-" if x is None else f"{1000 * x:.1f}"  # noqa: E731
            best = min(x for x in (t[0], t[1]) if x is not None)
            print(f"{n:>7d} {method:>10s} {top_k:>5d} {1000 * dense_ms:7.1f} {f(t[0]):>7s} {f(t[1]):>7s} "
                  f"{f(t[2]):>7s} {f(t[3]):>8s} {f(t[4]):>8s} {dense_ms / best:7.2f} {f(t[5]):>8s} {f(t[6]):>7s}")
        print("bound = tensor-core bound (default for 16-bit caches), bnd elem = the elementwise fp32 bound; "
              "no pdl = the step with plain launches (TritonTuning(chain_launches=False)), step g chains them")
    print(f"HBM copy {copy_gbs:.0f} GB/s; ms are medians of {args.reps} timings after warm-up "
          f"({'CUDA events' if DEVICE == 'cuda' else 'host time'})")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
