"""Sample sheets of bundled models: 6 images per class, columns = classes 0..9, image i (row-major) with
seed i, at the model's default sampling settings; 256-colour PNGs.

    .venv/bin/python bench/zoo/samples.py deep-llamagen tiny-mar     # writes bench/zoo/samples-<model>.png
"""

import argparse
from pathlib import Path

from quantcore.api import load_generator
from quantcore.images import compact_png, make_grid, save_png

ROWS, CLASSES = 6, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    labels = [c for _ in range(ROWS) for c in range(CLASSES)]
    for name in args.models:
        images = load_generator(name).generate(labels, seeds=list(range(len(labels))))
        path = save_png(make_grid(images, ncol=CLASSES), args.out / f"samples-{name}.png")
        compact_png(path)
        print(path)


if __name__ == "__main__":
    main()
