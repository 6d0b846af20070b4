"""Reference points for the proxy metrics of the bundled models, on CPU.

    .venv/bin/python bench/zoo/proxy_baselines.py   # writes bench/zoo/proxy_baselines.json

- real vs real: proxy-FID of 10k training images against the 10k test images (the floor a perfect
  generator would reach with 10k samples);
- VQ-zoo reconstructions of the test split against the test split (the tokenizer's own floor);
- each bundled generator at its default CFG, N images per class, against the test split, and the
  same for the FP model against itself under other seeds (sampling noise of proxy-FID at this N).
"""

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from quantcore.api import load_generator
from quantcore.eval.proxy import proxy_features, proxy_fid, proxy_metrics
from quantcore.zoo import BUNDLED, load_classifier, load_zoo_tokenizer
from quantcore.zoo.data import load_fashion_mnist, to_rgb32

PER_CLASS = 50


def images(split: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
    raw, labels = load_fashion_mnist(split)
    return torch.from_numpy(to_rgb32(raw[:count])), labels[:count]


def main() -> None:
    start = time.time()
    classifier = load_classifier()
    test, test_labels = images("test", 10000)
    train, _ = images("train", 10000)
    test_feats, test_probs = proxy_features(classifier, test)
    train_feats, _ = proxy_features(classifier, train)
    vq = load_zoo_tokenizer()
    recon = torch.cat([vq.decode_tokens(vq.encode_to_tokens(part)) for part in test.split(1000)])
    recon_feats, recon_probs = proxy_features(classifier, recon)
    out = {
        "classifier_test_accuracy": float((test_probs.argmax(1) == test_labels).mean()),
        "proxy_fid_train10k_vs_test": proxy_fid(train_feats, test_feats),
        "proxy_fid_vq_reconstructions_vs_test": proxy_fid(recon_feats, test_feats),
        "proxy_accuracy_vq_reconstructions": float((recon_probs.argmax(1) == test_labels).mean()),
        "generators": {},
    }
    labels = [c for c in range(10) for _ in range(PER_CLASS)]
    for name in BUNDLED:
        gen = load_generator(name)
        t = time.time()
        a = gen.generate(labels, seeds=list(range(len(labels))))
        seconds = time.time() - t
        b = gen.generate(labels, seeds=list(range(len(labels), 2 * len(labels))))
        metrics = proxy_metrics(classifier, a, np.array(labels), test_feats)
        fb, _ = proxy_features(classifier, b)
        fa, _ = proxy_features(classifier, a)
        metrics["proxy_fid_other_seeds"] = proxy_fid(fa, fb)
        metrics["cpu_seconds_per_image"] = seconds / len(labels)
        out["generators"][name] = {"cfg_scale": gen.defaults.cfg_scale, "images": len(labels), **metrics}
        print(name, out["generators"][name], flush=True)
    out["machine"] = f"{platform.machine()} cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out["seconds"] = round(time.time() - start, 1)
    path = Path(__file__).with_name("proxy_baselines.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
