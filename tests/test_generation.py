import torch

from quantcore.api import load_generator


def test_image_bytes_do_not_depend_on_the_other_images_of_the_batch():
    generator = load_generator("tiny-llamagen")
    alone = generator.generate([1], [124])
    batch = generator.generate([2, 1, 7, 7, 3, 0, 9, 4, 5, 6], [123, 124, 1, 2, 3, 4, 5, 6, 7, 8])
    assert torch.equal(alone[0], batch[1])  # the second chunk of the batch is padded too
    assert torch.equal(generator.generate([6], [8])[0], batch[9])
    assert batch.shape == (10, 32, 32, 3) and batch.dtype == torch.uint8
