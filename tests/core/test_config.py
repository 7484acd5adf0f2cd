"""Config and shape validation: every mistake is a ValueError that says what is wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import topkphi


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_sink=-1), "n_sink must be >= 0"),
        (dict(n_tail=-3), "n_tail must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(page_size=0), "page_size must be >= 1"),
        (dict(n_features=0), "n_features must be >= 1"),
        (dict(selection="random"), "unknown selection"),
        (dict(feature_map="cosine"), "unknown feature map"),
        (dict(feature_map="learned"), "needs calibrated parameters"),
        (dict(feature_map=3), "feature_map must be"),
        (dict(scale=-1.0), "scale must be"),
    ],
)
def test_invalid_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        topkphi.Config(**fields)


def test_shape_mismatches_raise():
    be = topkphi.get_backend("numpy")
    cfg = topkphi.Config()
    q, k, v = np.zeros((1, 6, 8)), np.zeros((1, 4, 10, 8)), np.zeros((1, 4, 10, 8))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        cfg.check_shapes(q, k, v)
    with pytest.raises(ValueError, match="q must be"):
        cfg.check_shapes(np.zeros((1, 4, 7)), k, v)
    with pytest.raises(ValueError, match="does not match"):
        be.build_summary(k, np.zeros((1, 4, 9, 8)), cfg)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N, d\]"):
        be.build_summary(np.zeros((4, 10, 8)), v, cfg)


def test_feature_map_validation():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4))
    with pytest.raises(ValueError, match="b_k has shape"):
        topkphi.FeatureMap.learned(w, b, w, b[:, :3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        topkphi.FeatureMap.learned(w, b, w * np.nan, b)
    fmap = topkphi.FeatureMap.learned(w, b, w, b)
    with pytest.raises(ValueError, match="parameters for 2 KV heads"):
        fmap.check_heads(3)
    with pytest.raises(ValueError, match="built for d=8"):
        topkphi.Config(feature_map=fmap).feature_map_for(16)


def test_unknown_and_unavailable_backends_name_the_alternatives():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        topkphi.get_backend("jax")
    assert "numpy" in topkphi.available_backends()


def test_core_imports_no_framework():
    code = "import sys, topkphi, topkphi.cli; " \
           "bad = {'torch', 'triton', 'mlx'} & {m.split('.')[0] for m in sys.modules}; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
