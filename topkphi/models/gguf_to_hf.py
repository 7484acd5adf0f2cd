"""GGUF -> HF folder (safetensors, config, generation config, tokenizer, chat template) via transformers.

transformers reads the GGUF and un-permutes the RoPE rows of q/k itself; the weights are
dequantized once here and saved in float16 (GGUF's scales are float16, so nothing is lost).
Needs torch, transformers, accelerate and gguf.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
from pathlib import Path

from topkphi.models.errors import ModelError, require
from topkphi.models.fetch import Progress, publish
from topkphi.models.gguf_file import read_gguf_header
from topkphi.models.gguf_tokenizer import TOKENIZER_KEYS, supported, write_tokenizer

TORCH_MODULES = ("torch", "transformers", "accelerate", "gguf")  # gguf: transformers' llama GGUF reader


def _load_dequantized(gguf: Path, dtype):
    """The model with every weight dense, on transformers 4 (always dense) and 5 (packed by default)."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:
        from transformers import GgufConfig  # transformers >= 5 keeps GGUF blocks packed unless asked

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    # Detach the GGUF quantizer, else save_pretrained refuses ("not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bad = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if bad:
        raise ModelError(f"{gguf}: transformers left weights packed ({', '.join(bad)}); cannot save them")
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' own progress bars while ours shows; the GGUF dequantizer's is plain tqdm."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        legacy = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        legacy = None
    tqdm = getattr(legacy, "tqdm", None)
    if tqdm is not None:
        legacy.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tqdm is not None:
            legacy.tqdm = tqdm


def convert_gguf_to_hf(gguf: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Write an HF-format folder for ``gguf`` at ``dest`` (atomically) and return ``dest``."""
    progress = progress or Progress(False)
    require("torch", *TORCH_MODULES)
    header = read_gguf_header(gguf, keep_arrays=TOKENIZER_KEYS)
    import torch
    from transformers import AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with progress.step(f"Converting {gguf.name} for torch (float16 safetensors)"), _quiet_transformers():
            try:
                model = _load_dequantized(gguf, torch.float16)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                if isinstance(e, ModelError):
                    raise
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"transformers cannot load {gguf.name}: {why}") from None
            model.save_pretrained(tmp)
            if supported(header.metadata):
                write_tokenizer(header, tmp)
            else:  # transformers' own converter covers sentencepiece and the other vocabularies
                AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        return publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
