"""Quantizers and quantized modules."""

from quantcore.quant.modules import (
    QuantLinear,
    QuantMatMul,
    build_quant_module,
    calibrate_weights,
    describe_quant_modules,
    finalize_calibration,
    iter_quant_modules,
    make_act_quantizer,
    set_quant_mode,
    swap_module,
)
from quantcore.quant.quantizer import (
    DEFAULT_PCTS,
    LogSqrt2Quantizer,
    Reservoir,
    UniformQuantizer,
    build_quantizer,
    check_bits,
    fake_quant,
    log_sqrt2_quant,
    params_from_range,
    search_range,
)

__all__ = [
    "DEFAULT_PCTS",
    "LogSqrt2Quantizer",
    "QuantLinear",
    "QuantMatMul",
    "Reservoir",
    "UniformQuantizer",
    "build_quant_module",
    "build_quantizer",
    "calibrate_weights",
    "check_bits",
    "describe_quant_modules",
    "fake_quant",
    "finalize_calibration",
    "iter_quant_modules",
    "log_sqrt2_quant",
    "make_act_quantizer",
    "params_from_range",
    "search_range",
    "set_quant_mode",
    "swap_module",
]
