"""Phi files: round trip, and refusing corrupt files or files made for another model (one-line ValueError)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("safetensors")

from topkphi.calibration.phi_file import ModelFingerprint, PhiMeta, load_phi, save_phi  # noqa: E402
from topkphi.feature_maps import FeatureMap  # noqa: E402

H, M, D, LAYERS = 2, 4, 8, 3


def maps(seed=0):
    rng = np.random.default_rng(seed)
    return [
        FeatureMap.learned(
            rng.standard_normal((H, M, D)),
            rng.standard_normal((H, M)),
            rng.standard_normal((H, M, D)),
            rng.standard_normal((H, M)),
        )
        for _ in range(LAYERS)
    ]


def meta(**kw):
    base = dict(
        model_id="tiny",
        config_hash="abc",
        weights_hash="w1",
        n_layers=LAYERS,
        n_kv_heads=H,
        d=D,
        m=M,
        scale=D**-0.5,
        n_sink=4,
        n_tail=16,
        top_k=8,
    )
    return PhiMeta(**{**base, **kw})


def fingerprint(**kw):
    base = dict(
        model_id="tiny", config_hash="abc", weights_hash="w1", n_layers=LAYERS, n_kv_heads=H, d=D, scale=D**-0.5
    )
    return ModelFingerprint(**{**base, **kw})


def one_line(err):
    assert "\n" not in str(err.value)


def test_round_trip(tmp_path):
    path = tmp_path / "phi.safetensors"
    original = maps()
    save_phi(path, original, meta(extra={"loss_after": [0.1]}))
    loaded, got = load_phi(path, fingerprint())
    assert got == meta(extra={"loss_after": [0.1]})
    for a, b in zip(original, loaded):
        assert b.kind == "learned" and b.n_features == M and b.n_param_heads == H
        for name in ("w_q", "b_q", "w_k", "b_k"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"config_hash": "other"}, "made for tiny"),
        ({"n_layers": 4}, "n_layers"),
        ({"d": 16}, "d 8"),
        ({"scale": 0.5}, "scale"),
        ({"weights_hash": "w2"}, "weights"),
    ],
)
def test_refuses_another_model(tmp_path, kw, fragment):
    path = tmp_path / "phi.safetensors"
    save_phi(path, maps(), meta())
    with pytest.raises(ValueError, match=fragment) as err:
        load_phi(path, fingerprint(**kw))
    one_line(err)


def test_missing_weights_hash_is_not_checked(tmp_path):
    path = tmp_path / "phi.safetensors"
    save_phi(path, maps(), meta())
    load_phi(path, fingerprint(weights_hash=""))  # e.g. a quantized mlx model


def test_refuses_truncated_and_garbage(tmp_path):
    path = tmp_path / "phi.safetensors"
    save_phi(path, maps(), meta())
    blob = path.read_bytes()
    for bad in (blob[: len(blob) // 2], blob[:5], b"not a safetensors file at all" * 3):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="phi file") as err:
            load_phi(path)
        one_line(err)
    with pytest.raises(ValueError, match="no such phi file"):
        load_phi(tmp_path / "nope.safetensors")


def test_refuses_wrong_shape_and_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "phi.safetensors"
    save_phi(path, maps(), meta())
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    tensors["layer.1.w_k"] = np.zeros((H, M + 1, D), np.float32)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"layer.1.w_k has shape") as err:
        load_phi(path)
    one_line(err)

    del tensors["layer.1.w_k"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="do not match its metadata"):
        load_phi(path)

    save_file({"x": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a topkphi phi file"):
        load_phi(path)

    save_file({"x": np.zeros(3, np.float32)}, str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(ValueError, match="format version 99"):
        load_phi(path)

    tensors = {k: v for k, v in tensors.items()}
    save_file({}, str(path), metadata={**metadata, "m": "abc"})
    with pytest.raises(ValueError, match="incomplete or invalid"):
        load_phi(path)


def test_nan_parameters_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "phi.safetensors"
    save_phi(path, maps(), meta())
    with safe_open(str(path), framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    tensors["layer.0.b_q"][0, 0] = np.nan
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="NaN"):
        load_phi(path)
