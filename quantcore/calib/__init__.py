"""Calibration data: the FP model's own CFG samples, selected, and the capture of layer inputs."""

from quantcore.calib.pool import CalibrationSet, CalibrationSpec, build_calibration_set

__all__ = ["CalibrationSet", "CalibrationSpec", "build_calibration_set"]
