"""What a per-prompt phi fit costs (chat --feature-map learned-prompt): capture pass + Adam steps, per device.

    python benchmarks/prompt_fit.py --device cuda --tokens 2886 --steps 100
    python benchmarks/prompt_fit.py --device cpu --tokens 2886 --steps 10

A randomly initialised Llama of SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads, d 64): the fit's
cost depends on shapes only, its quality needs real weights (docs/RESULTS.md). m 16, top_k 256, sink 4,
tail 64, the prompt's last 1024 queries, one every 8 positions (the chat defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import transformers
from rich.console import Console
from rich.table import Table

import topkphi
from topkphi.calibration.fit import fit_model
from topkphi.calibration.prompt import PROMPT_QUERIES, PromptFitter
from topkphi.capture import capture_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2886)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(config).to(args.device).eval()
    ids = torch.randint(0, config.vocab_size, (args.tokens,)).tolist()
    fitter = PromptFitter(net, "torch", topkphi.Config(), time_budget_s=1.0, n_features=16)
    opts = dataclasses.replace(fitter.opts, steps=args.steps)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    capture_ids(net, ids[:512], "torch", PROMPT_QUERIES)  # warm-up
    start = time.perf_counter()
    layers = capture_ids(net, ids, "torch", PROMPT_QUERIES)
    sync()
    captured = time.perf_counter()
    fits = fit_model([layers], opts)
    sync()
    end = time.perf_counter()
    table = Table(title=f"per-prompt fit, {args.device}, {args.tokens} tokens, {len(fits)} layers")
    for col in ("capture s", "fit s", "Adam steps / layer", "fit ms per step and layer (setup included)"):
        table.add_column(col, justify="right")
    steps = sum(f.steps for f in fits)
    table.add_row(f"{captured - start:.2f}", f"{end - captured:.2f}", f"{steps / len(fits):.0f}",
                  f"{1000 * (end - captured) / steps:.1f}")
    Console().print(table)
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
