"""quantcore: the PTQ4ARVG engine (models, tokenizers, quantization passes, artifacts, evaluation).

    import quantcore
    recipe = quantcore.Recipe.preset("ptq4arvg", w_bits=6, a_bits=6)
    calibration = quantcore.build_calibration_set(model, quantcore.CalibrationSpec(), sampling)
    report = quantcore.quantize(model, recipe, calibration)

Only torch and numpy; nothing here imports the service. Names load lazily and torch ops never run
at import time (a forked Celery child would hang on the OpenMP pool).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "quantcore.pipeline",
    "Recipe": "quantcore.recipe",
    "CalibrationSpec": "quantcore.calib",
    "build_calibration_set": "quantcore.calib",
    "quantize_job": "quantcore.api",
    "load_generator": "quantcore.api",
    "load_artifact": "quantcore.artifact",
    "to_real": "quantcore.quant.real",
    "FastSampler": "quantcore.fastgen",
    "evaluate": "quantcore.eval.evaluate",
    "InceptionFeatures": "quantcore.eval.inception",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantcore' has no attribute {name!r}")
