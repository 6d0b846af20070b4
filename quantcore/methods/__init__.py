"""The quantization passes, one registered file each, and calibration-set selection.

Importing this package registers every pass (smoothquant, shift, gps, stwq, dynamic_token) without
importing torch, so recipes validate in processes that never load the engine; the selection functions
(torch) load on first use.
"""

from quantcore.methods import dynamic_token, gps, shift, smoothquant, stwq  # noqa: F401 - registers
from quantcore.methods.gps import GPSStats, gps_scales
from quantcore.methods.shift import symmetric_shift
from quantcore.methods.smoothquant import smoothquant_scales

_SELECTION = (
    "cond_mask",
    "dgc_mahalanobis",
    "dgc_official",
    "expected_pinv_distance",
    "mahalanobis_pinv",
    "pca_mahalanobis",
    "random_selection",
    "select_calibration",
    "uniform_selection",
)

__all__ = ["GPSStats", "gps_scales", "smoothquant_scales", "symmetric_shift", *_SELECTION]


def __getattr__(name: str):
    if name in _SELECTION:
        from quantcore.methods import selection

        return getattr(selection, name)
    raise AttributeError(f"module 'quantcore.methods' has no attribute {name!r}")
