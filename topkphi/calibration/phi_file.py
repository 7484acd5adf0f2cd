"""Learned feature maps on disk: one safetensors file per model, with metadata that says what it fits.

Tensors ``layer.{i}.{w_q,b_q,w_k,b_k}`` (float32, ``[Hkv, m, d]`` and ``[Hkv, m]``); metadata (all
strings, as safetensors requires) holds the format version, model id, a hash of the model's
architecture config and of a slice of its weights, layer/head counts, d, m, the attention scale and
the sink/tail/top_k the maps were fitted for. Loading checks every field and refuses a corrupt file
or one made for another model with a one-line ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from topkphi.feature_maps import FeatureMap

FORMAT = "topkphi-phi"
FORMAT_VERSION = 1
PARAMS = ("w_q", "b_q", "w_k", "b_k")
# architecture fields shared by HF configs and mlx-lm model args: the hash is framework-neutral
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class PhiMeta:
    model_id: str
    config_hash: str
    n_layers: int
    n_kv_heads: int
    d: int
    m: int
    scale: float
    n_sink: int
    n_tail: int
    top_k: int
    weights_hash: str = ""  # empty: not recorded / not checked
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # fit statistics, informational

    def to_strings(self) -> dict[str, str]:
        out = {k: (json.dumps(v) if k == "extra" else str(v)) for k, v in asdict(self).items()}
        out["format"] = FORMAT
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str] | None) -> PhiMeta:
        if not meta or meta.get("format") != FORMAT:
            raise ValueError("not a topkphi phi file (no topkphi metadata)")
        try:
            version = int(meta["format_version"])
        except (KeyError, ValueError):
            raise ValueError("phi file has no valid format_version") from None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"phi file format version {version} is not supported (this topkphi reads {FORMAT_VERSION})"
            )
        try:
            ints = {k: int(meta[k]) for k in ("n_layers", "n_kv_heads", "d", "m", "n_sink", "n_tail", "top_k")}
            scale = float(meta["scale"])
            extra = json.loads(meta.get("extra", "{}"))
            out = cls(
                model_id=meta["model_id"],
                config_hash=meta["config_hash"],
                scale=scale,
                weights_hash=meta.get("weights_hash", ""),
                format_version=version,
                extra=extra,
                **ints,
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"phi file metadata is incomplete or invalid: {err}") from None
        if min(out.n_layers, out.n_kv_heads, out.d, out.m, out.top_k) < 1 or min(out.n_sink, out.n_tail) < 0:
            raise ValueError("phi file metadata holds a non-positive size")
        if not (math.isfinite(out.scale) and out.scale > 0):
            raise ValueError(f"phi file metadata holds an invalid scale {out.scale}")
        return out


@dataclass(frozen=True)
class ModelFingerprint:
    model_id: str
    config_hash: str
    weights_hash: str
    n_layers: int
    n_kv_heads: int
    d: int
    scale: float


def config_hash(config: dict) -> str:
    arch = {k: config.get(k) for k in ARCH_KEYS}
    if arch["head_dim"] is None and arch["hidden_size"] and arch["num_attention_heads"]:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    blob = json.dumps(arch, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_hash(array) -> str:
    """Hash of a small weight slice (first 16 rows of the first K projection), rounded to bf16-ish precision."""
    a = np.asarray(array, dtype=np.float32)[:16]
    return hashlib.sha256(np.round(a, 3).tobytes()).hexdigest()[:16]


def torch_fingerprint(model, model_id: str) -> ModelFingerprint:
    cfg = model.config.to_dict()
    n_heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    k_proj = next((m.k_proj.weight for m in model.modules() if hasattr(m, "k_proj")), None)
    scale = next((float(m.scaling) for m in model.modules() if hasattr(m, "scaling")), d**-0.5)
    return ModelFingerprint(
        model_id,
        config_hash(cfg),
        "" if k_proj is None else weights_hash(k_proj.detach().float().cpu().numpy()),
        cfg["num_hidden_layers"],
        cfg.get("num_key_value_heads") or n_heads,
        d,
        scale,
    )


def mlx_fingerprint(model, model_id: str) -> ModelFingerprint:
    """mlx-lm models: the same config hash; weights may be quantized, so no weights hash (not checked)."""
    args = getattr(model, "args", None)
    cfg = dict(vars(args)) if args is not None else {}
    n_heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    scale = next((float(m.scale) for m in model.modules() if hasattr(m, "scale") and hasattr(m, "n_kv_heads")), d**-0.5)
    return ModelFingerprint(
        model_id, config_hash(cfg), "", cfg["num_hidden_layers"], cfg.get("num_key_value_heads") or n_heads, d, scale
    )


def save_phi(path: str | Path, maps: list[FeatureMap], meta: PhiMeta) -> None:
    from safetensors.numpy import save_file

    if len(maps) != meta.n_layers:
        raise ValueError(f"{len(maps)} maps for {meta.n_layers} layers")
    tensors = {}
    for i, fmap in enumerate(maps):
        if fmap.kind != "learned":
            raise ValueError(f"layer {i}: only learned maps are saved, got {fmap.kind}")
        _check_map(fmap, meta, i)
        for name in PARAMS:
            tensors[f"layer.{i}.{name}"] = np.ascontiguousarray(getattr(fmap, name), dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta.to_strings())
    tmp.replace(path)


def _check_map(fmap: FeatureMap, meta: PhiMeta, i: int) -> None:
    shape = tuple(np.shape(fmap.w_q))
    if shape != (meta.n_kv_heads, meta.m, meta.d):
        raise ValueError(f"layer {i}: w_q has shape {shape}, expected {(meta.n_kv_heads, meta.m, meta.d)}")


def load_phi(path: str | Path, expect: ModelFingerprint | None = None) -> tuple[list[FeatureMap], PhiMeta]:
    """``(per-layer maps, metadata)``; with ``expect`` the file must have been made for that model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such phi file: {path}")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = PhiMeta.from_strings(fh.metadata())
            keys = set(fh.keys())
            expected = {f"layer.{i}.{n}" for i in range(meta.n_layers) for n in PARAMS}
            if keys != expected:
                missing, unknown = sorted(expected - keys), sorted(keys - expected)
                raise ValueError(
                    f"phi file tensors do not match its metadata (missing {missing[:2]}, unexpected {unknown[:2]})"
                )
            arrays = {k: fh.get_tensor(k) for k in keys}
    except SafetensorError as err:
        raise ValueError(f"phi file {path.name} is corrupt or truncated: {str(err).splitlines()[0]}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"phi file {path.name} cannot be read: {err}") from None
    maps = []
    h, m, d = meta.n_kv_heads, meta.m, meta.d
    for i in range(meta.n_layers):
        for name, shape in (("w_q", (h, m, d)), ("b_q", (h, m)), ("w_k", (h, m, d)), ("b_k", (h, m))):
            got = arrays[f"layer.{i}.{name}"].shape
            if tuple(got) != shape:
                raise ValueError(f"phi file tensor layer.{i}.{name} has shape {tuple(got)}, expected {shape}")
        try:
            maps.append(FeatureMap.learned(*(arrays[f"layer.{i}.{n}"] for n in PARAMS)))
        except ValueError as err:
            raise ValueError(f"phi file layer {i}: {err}") from None
    if expect is not None:
        check_model(meta, expect)
    return maps, meta


def check_model(meta: PhiMeta, fp: ModelFingerprint) -> None:
    """Refuse a file made for another model (one line)."""
    what = f"phi file was made for {meta.model_id}"
    if meta.config_hash != fp.config_hash:
        raise ValueError(f"{what} (config {meta.config_hash}), not for {fp.model_id} (config {fp.config_hash})")
    for name in ("n_layers", "n_kv_heads", "d"):
        if getattr(meta, name) != getattr(fp, name):
            raise ValueError(f"{what}: {name} {getattr(meta, name)} != {getattr(fp, name)} of {fp.model_id}")
    if abs(meta.scale - fp.scale) > 1e-6 * fp.scale:
        raise ValueError(f"{what}: attention scale {meta.scale:g} != {fp.scale:g} of {fp.model_id}")
    if meta.weights_hash and fp.weights_hash and meta.weights_hash != fp.weights_hash:
        raise ValueError(f"{what} (weights {meta.weights_hash}), not for {fp.model_id} (weights {fp.weights_hash})")
