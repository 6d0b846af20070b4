"""Bundled Fashion-MNIST models, their data loader, and the proxy and fidelity metrics."""

import gzip
import json

import numpy as np
import pytest
import torch

from conftest import needs_fashion_mnist, random_llamagen
from quantcore.api import load_generator
from quantcore.checkpoint import read_state_dict
from quantcore.errors import ConfigError, DatasetError
from quantcore.eval.fidelity import teacher_forced_fidelity, token_agreement, token_agreement_by_position
from quantcore.eval.frechet import Gaussian, frechet_distance
from quantcore.eval.proxy import (
    proxy_class_accuracy,
    proxy_fid,
    proxy_inception_score,
    proxy_metrics,
)
from quantcore.models import family_module
from quantcore.zoo import (
    BUNDLED,
    BUNDLED_CONFIGS,
    CLASSIFIER_WEIGHTS,
    ZOO_TOKENIZERS,
    ZOO_VQ,
    ZOO_VQ16_NAME,
    bundled_entries,
    heldout_sequences,
    load_classifier,
    load_zoo_tokenizer,
)
from quantcore.zoo.classifier import FEATURE_DIM, ProxyClassifier
from quantcore.zoo.data import load_fashion_mnist, read_idx, to_rgb32
from quantcore.zoo.train import record

# -- data ---------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_loader_reads_the_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    rgb = to_rgb32(images[:4])
    assert rgb.shape == (4, 32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :2] == 0).all() and (rgb[:, 2:30, 2:30, 1] == images[:4]).all()
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_loader_names_the_package_when_files_are_missing(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ConfigError):
        load_fashion_mnist("validation", tmp_path)


def test_idx_round_trip_and_bad_header(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    header = bytes([0, 0, 8, 3]) + np.array(data.shape, ">i4").tobytes()
    good.write_bytes(gzip.compress(header + data.tobytes()))
    assert (read_idx(good) == data).all()
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 13, 1]) + header[4:8] + data.tobytes()))
    with pytest.raises(DatasetError, match="unsigned-byte"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(header + data.tobytes()[:-1]))
    with pytest.raises(DatasetError, match="data bytes"):
        read_idx(short)


# -- proxy metrics ------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2000, 8))
    assert abs(proxy_fid(feats, feats)) < 1e-8
    shifts = [proxy_fid(feats, feats + s) for s in (0.1, 0.5, 1.0)]
    assert shifts == sorted(shifts) and abs(shifts[-1] - 8.0) < 1e-6  # |mu|^2 of a shift of 1 in 8 dims
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu = np.array([1.0, 0.0, 2.0])
    got = frechet_distance(
        Gaussian.from_moments(np.zeros(3), np.diag(a)), Gaussian.from_moments(mu, np.diag(b))
    )
    assert got == pytest.approx(5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_proxy_inception_score_and_accuracy():
    assert proxy_inception_score(np.full((10, 5), 0.2)) == pytest.approx(1.0)
    confident = np.eye(5)[np.arange(20) % 5]
    assert proxy_inception_score(confident) == pytest.approx(5.0, rel=1e-6)
    assert proxy_inception_score(confident, splits=2) == pytest.approx(5.0, rel=1e-6)
    assert proxy_class_accuracy(confident, np.arange(20) % 5) == 1.0
    assert proxy_class_accuracy(confident, np.zeros(20)) == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        proxy_class_accuracy(confident, np.zeros(3))


def test_proxy_metrics_keys_say_proxy():
    torch.manual_seed(0)
    classifier = ProxyClassifier().eval()
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    ref = np.random.default_rng(0).normal(size=(50, FEATURE_DIM))
    out = proxy_metrics(classifier, images, np.arange(6) % 10, reference_features=ref, other_features=ref)
    assert set(out) == {"proxy_class_accuracy", "proxy_is", "proxy_fid_test", "proxy_fid_other"}
    with pytest.raises(ConfigError):
        proxy_metrics(classifier, images[:, :28, :28], np.zeros(6))


# -- fidelity -----------------------------------------------------------------------------------------


def test_token_agreement():
    a = torch.arange(12).view(3, 4)
    b = a.clone()
    assert token_agreement(a, b) == 1.0
    b[:, 2:] = -1
    assert token_agreement(a, b) == 0.5
    assert token_agreement_by_position(a, b).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        token_agreement(a, b[:2])


def test_teacher_forced_fidelity():
    ref = random_llamagen("llamagen-tiny", std=0.1)
    cfg = ref.config
    classes = torch.arange(6) % cfg.num_classes
    tokens = torch.randint(0, cfg.vocab_size, (6, cfg.num_tokens), generator=torch.Generator().manual_seed(0))
    same = teacher_forced_fidelity(ref, ref, classes, tokens, batch_size=4)
    assert same["logit_kl"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    other = random_llamagen("llamagen-tiny", seed=1, std=0.1)
    diff = teacher_forced_fidelity(ref, other, classes, tokens)
    with torch.no_grad():
        p, q = (m.sequence_logits(classes, tokens).double().log_softmax(-1) for m in (ref, other))
    expected_kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert diff["logit_kl"] == pytest.approx(expected_kl) and diff["logit_kl"] > 0
    assert diff["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))


# -- bundled weights ----------------------------------------------------------------------------------


def test_bundled_entries_and_strict_loading():
    names = [e.name for e in bundled_entries()]
    assert names == [
        "tiny-llamagen",
        "tiny-par",
        "tiny-var",
        "tiny-rar",
        "deep-llamagen",
        "deep-var",
        "tiny-mar",
    ]
    for entry, checkpoint, tokenizer_checkpoint, family in BUNDLED.values():
        assert "bundled" in entry.tags
        assert tokenizer_checkpoint == ZOO_TOKENIZERS[entry.config.tokenizer][2]
        if family == "llamagen":
            assert entry.config.vocab_size == ZOO_VQ.codebook_size
        # strict: every key present with the model's shape (load_checkpoint raises otherwise)
        sd = read_state_dict(checkpoint)
        assert sd.keys() == family_module(family).build(entry.config).state_dict().keys()
    load_zoo_tokenizer()
    load_classifier()
    total = sum(p.stat().st_size for p in CLASSIFIER_WEIGHTS.parent.glob("*.safetensors"))
    assert total <= 40 * 2**20  # of the tree's 50 MiB: 25 MiB for the tiny models, 15 MiB for the rest


@needs_fashion_mnist
def test_vq_zoo_16_gives_256_tokens_and_reconstructs_test_images():
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(to_rgb32(images[:16]))
    vq = load_zoo_tokenizer(None, ZOO_VQ16_NAME)
    with torch.no_grad():
        tokens = vq.encode_to_tokens(x)
        recon = vq.decode_tokens(tokens)
    assert tokens.shape == (16, 256) and int(tokens.max()) < vq.config.codebook_size
    mse = float(((recon.float() - x.float()) / 127.5).pow(2).mean())
    assert 10 * np.log10(4.0 / mse) > 28  # training.json: 33.6 dB on the whole test split


def test_deep_models_are_deep_and_bundled():
    config = BUNDLED_CONFIGS["deep-llamagen"]
    assert config.n_layer >= 8 and config.num_tokens == 256 and config.tokenizer == ZOO_VQ16_NAME
    assert "deep-llamagen" in BUNDLED
    assert BUNDLED_CONFIGS["deep-var"].depth >= 8 and "deep-var" in BUNDLED


def test_bundled_generators_make_recognisable_images():
    """FP proxy class accuracy with the default CFG on 3 images per class (training.json: 100 per class)."""
    classifier = load_classifier()
    labels = [c for c in range(10) for _ in range(3)]
    for name in BUNDLED:
        images = load_generator(name).generate(labels, seeds=list(range(30)))
        assert images.shape == (30, 32, 32, 3) and images.dtype == torch.uint8
        out = proxy_metrics(classifier, images, np.array(labels))
        # tiny-mar reaches 0.764 on 500 images (training.json's sweep), the others >= 0.8
        assert out["proxy_class_accuracy"] >= (0.6 if name == "tiny-mar" else 0.8), (name, out)


def test_training_record_merges(tmp_path):
    record(tmp_path, "a", {"seconds": 1})
    record(tmp_path, "b", {"seconds": 2})
    assert json.loads((tmp_path / "training.json").read_text()) == {"a": {"seconds": 1}, "b": {"seconds": 2}}


@needs_fashion_mnist
def test_heldout_sequences_feed_teacher_forced_fidelity():
    gen = load_generator("tiny-par")
    classes, tokens = heldout_sequences(gen.model, gen.tokenizer, 8)
    assert classes.shape == (8,) and tokens.shape == (8, gen.model.config.num_tokens)
    same = teacher_forced_fidelity(gen.model, gen.model, classes, tokens)
    assert same["top1_agreement"] == 1.0 and same["logit_kl"] == pytest.approx(0.0, abs=1e-9)
