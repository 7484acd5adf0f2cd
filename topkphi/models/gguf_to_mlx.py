"""GGUF (llama architecture) -> mlx-lm folder, keeping the weights quantized. Needs no torch.

``mx.load`` returns Q4_0/Q4_1 weights as MLX affine 4-bit and Q8_0 as affine 8-bit, both with
group size 32, as ``{name}.weight`` (uint32 packed), ``.scales`` and ``.biases`` (float16).
GGUF stores the q/k rows interleaved for llama.cpp's RoPE; we un-permute them so the folder
uses the standard (non-traditional) RoPE like the HF checkpoint. Groups run along the input
dim, so permuting rows of weight, scales and biases together is exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

from topkphi.models.errors import ModelError, require
from topkphi.models.fetch import Progress, publish
from topkphi.models.gguf_file import read_gguf_header
from topkphi.models.gguf_tokenizer import TOKENIZER_KEYS, supported, write_tokenizer

MLX_MODULES = ("mlx", "mlx_lm")

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    module, _, leaf = gguf_name.rpartition(".")
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{leaf}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    if m is None or m.group(2) not in _LAYER:
        raise ModelError(f"unexpected tensor {gguf_name} in a llama GGUF")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{leaf}"


def unpermute_rows(x, n_heads: int):
    """Undo llama.cpp's RoPE row order: per head, rows (i, half) -> (half, i)."""
    rows = x.shape[0]
    head_dim = rows // n_heads
    return x.reshape(n_heads, head_dim // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _config(md: dict, header, quantization: dict, tied: bool) -> dict:
    a = header.architecture
    n_heads = int(md[f"{a}.attention.head_count"])
    hidden = int(md[f"{a}.embedding_length"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(md[f"{a}.feed_forward_length"]),
        "num_hidden_layers": int(md[f"{a}.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(md.get(f"{a}.attention.head_count_kv", n_heads)),
        "head_dim": int(md.get(f"{a}.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(md[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(md.get(f"{a}.rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "max_position_embeddings": int(md.get(f"{a}.context_length", 2048)),
        "vocab_size": int(md.get(f"{a}.vocab_size", len(md["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float16",
        "quantization": quantization,
        "quantization_config": quantization,
    }
    scaling = md.get(f"{a}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(md[f"{a}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ModelError(f"{header.path.name}: RoPE scaling '{scaling}' is not supported for MLX")
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in md:
            config[name] = int(md[f"tokenizer.ggml.{key}_token_id"])
    return config


def convert_gguf_to_mlx(gguf: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Write an mlx-lm folder for ``gguf`` at ``dest`` (atomically) and return ``dest``."""
    progress = progress or Progress(False)
    require("mlx", *MLX_MODULES)
    header = read_gguf_header(gguf, keep_arrays=TOKENIZER_KEYS)
    md, arch = header.metadata, header.architecture
    if arch != "llama":
        raise ModelError(f"{gguf.name}: GGUF architecture '{arch}' is not supported for MLX (llama only)")
    if any(t.name == "rope_freqs.weight" for t in header.tensors):
        raise ModelError(f"{gguf.name}: llama-3 style rope_freqs are not supported for MLX")
    if not supported(md) and importlib.util.find_spec("torch") is None:  # transformers' converter imports torch
        kind = f"{md.get('tokenizer.ggml.model')}/{md.get('tokenizer.ggml.pre', 'default')}"
        raise ModelError(f"{gguf.name}: a {kind} tokenizer needs transformers with torch: pip install 'topkphi[torch]'")
    import mlx.core as mx

    try:
        raw = mx.load(str(gguf))
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"mlx cannot read {gguf.name}: {str(e).splitlines()[0]}") from None
    in_dims = {t.name.rpartition(".")[0]: t.shape[0] for t in header.tensors}
    heads = {"attn_q": int(md[f"{arch}.attention.head_count"]),
             "attn_k": int(md.get(f"{arch}.attention.head_count_kv", md[f"{arch}.attention.head_count"]))}

    weights, quant = {}, {}
    with progress.bar("Converting to MLX", len(raw)) as advance:
        for name, x in raw.items():
            module, _, leaf = name.rpartition(".")
            kind = module.rpartition(".")[2]
            if kind in heads:
                x = unpermute_rows(x, heads[kind])
            if leaf == "scales":
                n_in = in_dims[module]  # group size, then bits from the packed uint32 width
                bits = raw[module + ".weight"].shape[-1] * 32 // n_in
                quant[hf_name(name).rpartition(".")[0]] = (n_in // x.shape[-1], bits)
            elif x.dtype in (mx.float32, mx.bfloat16):
                x = x.astype(mx.float16)
            weights[hf_name(name)] = x
            advance()
    if not quant:
        raise ModelError(f"{gguf.name}: no Q4_0/Q4_1/Q8_0 weights; MLX conversion expects a quantized GGUF")
    (group, bits), _ = Counter(quant.values()).most_common(1)[0]
    quantization = {"group_size": group, "bits": bits, "mode": "affine"}
    quantization.update({p: {"group_size": g, "bits": b} for p, (g, b) in quant.items() if (g, b) != (group, bits)})
    tied = "lm_head.weight" not in weights

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with progress.step("Writing model.safetensors and tokenizer"):
            config = _config(md, header, quantization, tied)
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            if supported(md):
                write_tokenizer(header, tmp)
            else:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        return publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
