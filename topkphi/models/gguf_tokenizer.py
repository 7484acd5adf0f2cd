"""Build an HF ``tokenizer.json`` from a GGUF vocabulary with the ``tokenizers`` library alone.

Written here (not taken from transformers' GGUF converter) because that converter imports torch,
and because it drops the digit split of llama.cpp's ``smollm`` pre-tokenizer, which the original
SmolLM2 tokenizer has. Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with a
known pre-tokenizer are built; :func:`supported` says whether a file qualifies.
"""

from __future__ import annotations

import json
from pathlib import Path

from topkphi.models.gguf_file import GgufHeader

TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")

# llama.cpp pre-tokenizer name -> split regex applied before the byte-level step (None: GPT-2's own).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": "digits", "starcoder": "digits",
                  "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
_CONTROL, _USER_DEFINED = 3, 4


def supported(metadata: dict) -> bool:
    return (
        metadata.get("tokenizer.ggml.model") == "gpt2"
        and metadata.get("tokenizer.ggml.pre", "default") in PRE_TOKENIZERS
    )


def _special(metadata: dict, tokens: list[str], key: str) -> str | None:
    i = metadata.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(i)] if i is not None and int(i) < len(tokens) else None


def build_tokenizer(metadata: dict):
    """A ``tokenizers.Tokenizer`` for a header read with ``keep_arrays=TOKENIZER_KEYS``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
    merges = [tuple(str(m).split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    split = PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre", "default")]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()

    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [])]
    added = [
        AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
        for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)  # ids already in the vocab: they keep them

    bos = _special(metadata, tokens, "bos")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab[bos])],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(header: GgufHeader, out: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into ``out``."""
    md = header.metadata
    tokens = [str(t) for t in md["tokenizer.ggml.tokens"]]
    build_tokenizer(md).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _special(md, tokens, "bos"),
        "eos_token": _special(md, tokens, "eos"),
        "unk_token": _special(md, tokens, "unknown"),
        "pad_token": _special(md, tokens, "padding"),
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(md.get(f"{header.architecture}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in md:
        config["chat_template"] = str(md["tokenizer.chat_template"])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
