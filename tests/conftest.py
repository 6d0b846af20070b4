import copy
import re
import subprocess
import sys
import warnings

import pytest
import torch

from quantcore.models.llamagen import MODELS, LlamaGen
from quantcore.registry import RandomWeightsWarning
from quantcore.zoo.data import FILES, data_dir

# the real Fashion-MNIST files (apt package dataset-fashion-mnist, or FASHION_MNIST_DIR): CI installs them
needs_fashion_mnist = pytest.mark.skipif(
    not all((data_dir() / name).is_file() for names in FILES.values() for name in names),
    reason="Fashion-MNIST not installed (dataset-fashion-mnist, or set FASHION_MNIST_DIR)",
)


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


def layer_errors(sim, real, report, calib, ref_dtype=torch.float64) -> dict[str, float]:
    """Per layer `report` converted: max |real - sim| / max |sim| on the inputs a teacher-forced pass of
    the simulated model gives it, the simulation run in `ref_dtype`."""
    inputs = {}
    hooks = [
        sim.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a))
        for n, e in report.items()
        if e["path"] != "simulated"
    ]
    device = next(sim.parameters()).device
    with torch.no_grad():
        sim.sequence_logits(calib.classes[:4].to(device), calib.tokens[:4].to(device))
        for h in hooks:
            h.remove()
        ref_model = copy.deepcopy(sim).to(ref_dtype)
        errors = {}
        for name, (x, pos) in inputs.items():
            ref = ref_model.get_submodule(name)(x.to(ref_dtype), pos).double()
            got = real.get_submodule(name)(x, pos).double()
            errors[name] = float((got - ref).abs().max() / ref.abs().max())
    return errors


def assert_int8_exact(errors: dict[str, float], exact: float, bound: float = 2e-3) -> None:
    """int8 layers (`layer_errors`) are exact in the codes, except where float32 (kernel) and float64
    (simulation) put one x/scale on opposite sides of a half step: one code of one input, ~6e-4 of the
    output range (seen in one layer on an H200, 2026-12-02, and on an Intel Xeon CPU, 2026-12-04)."""
    inexact = {name: e for name, e in errors.items() if e > exact}
    assert len(inexact) <= 1 and max(errors.values()) < bound, inexact


# one launch per line of a compiled module's call(): a generated kernel, or a GEMM it calls out to
LAUNCH = re.compile(
    r"^\s*(?:(?P<kernel>(?:cpp|triton_(?:poi|red|per))_fused_\w+)(?:\.run)?\("
    r"|(?:\w+ = )?(?:extern_kernels\.(?P<extern>\w+)|torch\.ops\.(?P<op>\w+\.\w+)\.default)\()",
    re.M,
)


def compiled_ffn_launches(model, rows: int) -> tuple[list[str], list[str]]:
    """What Inductor launches for the residual FFN of a LlamaGen's block 0 (norm, w1/w3, SiLU x, w2, + h)
    at `rows` tokens of one position: (its generated kernels, the GEMMs and custom ops it calls out to).
    The generated kernels are the elementwise passes around the GEMMs."""
    from torch._inductor.utils import run_and_get_code

    block = model.layers[0]
    param = next(model.parameters())
    h = torch.randn(rows, 1, model.config.dim, device=param.device, dtype=param.dtype)
    pos = torch.arange(1, 2, device=param.device)
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(
            torch.compile(lambda h, pos: h + block.feed_forward(block.ffn_norm(h), pos), fullgraph=True),
            h,
            pos,
        )
    launches = [m.groupdict() for m in LAUNCH.finditer("\n".join(c[c.index("def call(") :] for c in code))]
    kernels = [m["kernel"] for m in launches if m["kernel"]]
    return kernels, [m["extern"] or m["op"] for m in launches if not m["kernel"]]


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    """`python -m quantcore ARGS` in a subprocess; asserts success unless check=False."""
    proc = subprocess.run(
        [sys.executable, "-m", "quantcore", *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
