"""The setup the probe scripts (ranges, sensitivity, variants) share: a bundled model's FP generator on one
thread without autograd, its held-out test-split sequences, and a calibration set."""

import torch

from quantcore import zoo
from quantcore.api import ImageGenerator, load_generator
from quantcore.calib import CalibrationSet, CalibrationSpec, build_calibration_set


def heldout(
    num_sequences: int, model: str = "tiny-llamagen"
) -> tuple[ImageGenerator, torch.Tensor, torch.Tensor]:
    """(FP generator of `model`, classes, token sequences) of `num_sequences` held-out images."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    fp = load_generator(model, real=False)
    classes, tokens = zoo.heldout_sequences(fp.model, fp.tokenizer, num_sequences)
    return fp, classes, tokens


def calibration(fp: ImageGenerator, num_samples: int) -> CalibrationSet:
    spec = CalibrationSpec(num_samples=num_samples, batch_size=64)
    return build_calibration_set(fp.model, spec, fp.default_sampling)
