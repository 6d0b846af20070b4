"""Model-independent math of the passes: smoothing scales and calibration-set selection."""

from quantcore.methods.selection import (
    cond_mask,
    dgc_mahalanobis,
    dgc_official,
    expected_pinv_distance,
    mahalanobis_pinv,
    pca_mahalanobis,
    random_selection,
    select_calibration,
    uniform_selection,
)
from quantcore.methods.smoothing import GPSStats, gps_scales, smoothquant_scales, symmetric_shift

__all__ = [
    "GPSStats",
    "cond_mask",
    "dgc_mahalanobis",
    "dgc_official",
    "expected_pinv_distance",
    "gps_scales",
    "mahalanobis_pinv",
    "pca_mahalanobis",
    "random_selection",
    "select_calibration",
    "smoothquant_scales",
    "symmetric_shift",
    "uniform_selection",
]
