"""Random-initialised Llama-shaped models: real architectures, no downloaded weights.

    python benchmarks/random_model.py --shape llama-1b --tokenizer-from DIR --out /tmp/rand-llama-1b

writes an HF folder that `topkphi chat --model /tmp/rand-llama-1b` loads (speed does not depend
on the weights' values, so this is how GPU runs measure models that cannot be carried there).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # Llama-3.2-1B and Llama-3-8B attention/MLP shapes
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def build(shape: str, device: str, dtype: torch.dtype, vocab_size: int | None = None,
          max_positions: int = 131072) -> LlamaForCausalLM:
    fields = dict(SHAPES[shape])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    config = LlamaConfig(max_position_embeddings=max_positions, rope_theta=500000.0, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-1b")
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="Folder whose tokenizer files to copy.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(args.tokenizer_from / "tokenizer.json")).get_vocab_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.shape, device, torch.bfloat16, vocab_size=vocab_size)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer_from / name).exists():
            shutil.copy(args.tokenizer_from / name, args.out / name)
    print(f"wrote {args.out}: {args.shape}, vocab {vocab_size}")


if __name__ == "__main__":
    main()
