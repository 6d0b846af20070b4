import warnings

import pytest
import torch

from quantcore.models.llamagen import MODELS, LlamaGen
from quantcore.registry import RandomWeightsWarning


@pytest.fixture(autouse=True)
def _quiet_random_weight_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def random_llamagen(name: str, seed: int = 0, dtype=torch.float32, std: float = 0.5) -> LlamaGen:
    """A tiny model with weights large enough that sampling is not uniform noise."""
    torch.manual_seed(seed)
    model = LlamaGen(MODELS[name].config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
