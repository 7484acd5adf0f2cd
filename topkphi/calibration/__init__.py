"""Learned feature maps: calibration text, the fit, and the phi file (SPEC section 4, ``learned``)."""

from topkphi.calibration.fit import FitOptions, LayerFit, fit_layer, fit_model
from topkphi.calibration.phi_file import (
    ModelFingerprint,
    PhiMeta,
    check_model,
    load_phi,
    mlx_fingerprint,
    save_phi,
    torch_fingerprint,
)
from topkphi.calibration.replay import replay_errors

__all__ = [
    "FitOptions",
    "LayerFit",
    "ModelFingerprint",
    "PhiMeta",
    "check_model",
    "fit_layer",
    "fit_model",
    "load_phi",
    "mlx_fingerprint",
    "replay_errors",
    "save_phi",
    "torch_fingerprint",
]
