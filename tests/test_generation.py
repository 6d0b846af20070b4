import pytest
import torch

from quantcore.api import load_generator
from quantcore.generation import ImageGenerator


def test_image_bytes_do_not_depend_on_the_other_images_of_the_batch():
    generator = load_generator("tiny-llamagen")
    alone = generator.generate([1], [124])
    batch = generator.generate([2, 1, 7, 7, 3, 0, 9, 4, 5, 6], [123, 124, 1, 2, 3, 4, 5, 6, 7, 8])
    assert torch.equal(alone[0], batch[1])  # the second chunk of the batch is padded too
    assert torch.equal(generator.generate([6], [8])[0], batch[9])
    assert batch.shape == (10, 32, 32, 3) and batch.dtype == torch.uint8


@pytest.mark.parametrize("name", ["tiny-llamagen", "tiny-rar", "tiny-var"])
def test_the_fast_sampler_path_generates_the_same_images(name):
    slow = load_generator(name)
    assert not slow.fast  # on the CPU the family sampler is the default
    fast = ImageGenerator(
        slow.model, slow.tokenizer, slow.defaults, name, chunk_size=slow.chunk_size, fast=True
    )
    classes, seeds = [0, 5, 9], [3, 4, 5]  # one padded chunk
    seen = []
    tokens = fast.generate_tokens(classes, seeds, progress=seen.append)
    assert torch.equal(tokens, slow.generate_tokens(classes, seeds))
    assert seen[-1] == fast.progress_total(len(classes))
    # new settings rebuild the sampler; the same settings reuse it
    first = fast._fast_sampler(fast.default_sampling | {"temperature": 0.9})
    assert fast._fast_sampler(fast.default_sampling | {"temperature": 0.9}) is first
    assert torch.equal(
        fast.generate_tokens(classes, seeds, temperature=0.9),
        slow.generate_tokens(classes, seeds, temperature=0.9),
    )
