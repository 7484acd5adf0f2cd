"""Decode tokens/s of a random-initialised Llama-shaped model at long context: dense vs topkphi.

    python benchmarks/chat_decode.py --shape llama-1b --context 32768 --new-tokens 64

No weights are downloaded: the model has a real architecture and random weights, which is all
that speed depends on. Prints a table and the command; run it on the GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from random_model import SHAPES, build

import topkphi
from topkphi.generation.torch_engine import TorchEngine


class NullTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-1b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--backend", default="triton" if torch.cuda.is_available() else "torch")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args.shape, device, dtype, max_positions=max(131072, args.context + args.new_tokens))
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    methods = [("dense", None)]
    for top_k in args.top_k:
        for feature_map in ("prf", None):
            methods.append((f"page top_k={top_k} {'+phi' if feature_map else 'only'}",
                            topkphi.Config(n_sink=4, n_tail=64, top_k=top_k, selection="page", page_size=16,
                                           feature_map=feature_map, n_features=64)))
    kernel = topkphi.get_backend(args.backend)
    for name, cfg in methods:
        engine = TorchEngine(model, NullTokenizer(), cfg, None if cfg is None else kernel)
        # warm-up past the largest budget, so the kernels the measured run needs are compiled
        engine.generate(prompt[: min(args.context, 4 * max(args.top_k) + 512)], 20)
        torch.cuda.empty_cache() if device == "cuda" else None
        start = time.perf_counter()
        engine.generate(prompt, args.new_tokens)
        total = time.perf_counter() - start
        s = engine.stats
        rows.append((name, s.prefill_s, s.decode_tps, s.read_fraction, s.rho, total))
        print(f"{name}: {s.line()}", flush=True)
        del engine
    dense_tps = rows[0][2]
    print(f"\n{args.shape}, context {args.context}, {args.new_tokens} new tokens, {device} {dtype}, "
          f"backend {args.backend}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"{'method':28s} {'prefill s':>9s} {'decode tok/s':>12s} {'vs dense':>8s} {'KV read':>8s} {'rho':>6s}")
    for name, prefill, tps, read, rho, _ in rows:
        print(f"{name:28s} {prefill:9.2f} {tps:12.1f} {tps / dense_tps:7.2f}x {read:8.1%} "
              f"{'-' if rho is None else f'{rho:.3f}':>6s}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
