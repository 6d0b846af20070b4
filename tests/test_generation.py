import pytest
import torch
from reference_sampling import reference_tokens

from quantcore.api import load_generator


def test_image_bytes_do_not_depend_on_the_other_images_of_the_batch():
    generator = load_generator("tiny-llamagen")
    alone = generator.generate([1], [124])
    batch = generator.generate([2, 1, 7, 7, 3, 0, 9, 4, 5, 6], [123, 124, 1, 2, 3, 4, 5, 6, 7, 8])
    assert torch.equal(alone[0], batch[1])  # the second chunk of the batch is padded too
    assert torch.equal(generator.generate([6], [8])[0], batch[9])
    assert batch.shape == (10, 32, 32, 3) and batch.dtype == torch.uint8


@pytest.mark.parametrize("name", ["tiny-llamagen", "tiny-par", "tiny-rar", "tiny-var"])
def test_generators_sample_the_reference_tokens_and_reuse_their_sampler(name):
    generator = load_generator(name)
    classes, seeds = [0, 5, 9], [3, 4, 5]  # one padded chunk
    seen = []
    tokens = generator.generate_tokens(classes, seeds, progress=seen.append)
    pad = generator.chunk_size - len(classes)
    expected = reference_tokens(
        generator.model, torch.tensor(classes + [9] * pad), seeds + [5] * pad, **generator.default_sampling
    )
    assert torch.equal(tokens, expected[:3])
    assert seen[-1] == generator.progress_total(len(classes))
    # the same settings reuse the sampler (its caches and graph); new settings rebuild it
    first = generator.sampler._sampler[1]
    generator.generate_tokens(classes, seeds)
    assert generator.sampler._sampler[1] is first
    generator.generate_tokens(classes, seeds, temperature=0.9)
    assert generator.sampler._sampler[1] is not first
