"""The official LlamaGen sampler, bf16, with its own compile, timed on this card: is our baseline fair?

    PYTHONPATH=. python bench/speed/official_llamagen.py --repo SCRATCH_CLONE --batches 1,64,256 --out DIR

SCRATCH_CLONE is a checkout of github.com/FoundationVision/LlamaGen (its `autoregressive/models` and
`utils` folders are enough); it is imported from there, never copied into this project. The model is
built as `autoregressive/sample/sample_c2i.py` builds it (GPT-XL, 16384 codes, 576 tokens, one class
token, bf16) with random weights (speed does not depend on their values), compiled as that script does
(`torch.compile(model, mode="reduce-overhead", fullgraph=True)`), and sampled by its `generate` with CFG
(2 x batch rows per step) and the registry's LlamaGen-XL sampling settings. Each batch: one untimed call
(compile, CUDA-graph recording), then the median of `--reps` timed calls. Compare with the `bf16` rows
of `run.py gpu --models llamagen-xl`, measured in the same call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from quantcore.registry import get_spec

GPT_NAMES = {"llamagen-b": "GPT-B", "llamagen-l": "GPT-L", "llamagen-xl": "GPT-XL"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a scratch clone of the official LlamaGen")
    parser.add_argument("--model", default="llamagen-xl", choices=sorted(GPT_NAMES))
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.repo / "autoregressive" / "models" / "gpt.py").is_file():
        print(
            f"error: {args.repo} holds no autoregressive/models/gpt.py; give a LlamaGen checkout",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(args.repo))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    spec = get_spec(args.model)
    sampling = spec.entry.sampling.to_dict()
    torch.manual_seed(0)
    model = GPT_models[GPT_NAMES[args.model]](
        vocab_size=spec.config.vocab_size,
        block_size=spec.config.num_tokens,
        num_classes=spec.config.num_classes,
        cls_token_num=1,
        model_type="c2i",
    ).to(device="cuda", dtype=torch.bfloat16)
    model.eval()
    model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    props = torch.cuda.get_device_properties(0)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": props.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": []}
    rows = result["rows"]
    for batch in [int(b) for b in args.batches.split(",")]:
        classes = torch.arange(batch, device="cuda") % spec.config.num_classes
        torch.cuda.reset_peak_memory_stats()

        def run(classes=classes):
            return generate(
                model,
                classes,
                spec.config.num_tokens,
                cfg_scale=sampling["cfg_scale"],
                cfg_interval=sampling["cfg_interval"],
                temperature=sampling["temperature"],
                top_k=sampling["top_k"],
                top_p=sampling["top_p"],
                sample_logits=True,
            )

        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        latency = statistics.median(times)
        row = {
            "model": args.model,
            "variant": "official-bf16-compiled",
            "batch": batch,
            "latency_s": round(latency, 4),
            "images_per_s": round(batch / latency, 2),
            "first_call_s": round(first, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        # after every batch: a call cut off at its limit (compiling batch 256 takes minutes) keeps the rest
        (args.out / f"official-{args.model}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
