"""Inception metrics: the network and its input, Fréchet distance, precision/recall, bootstrap, references."""

import json
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from quantcore.errors import ConfigError
from quantcore.eval import inception
from quantcore.eval.bootstrap import bootstrap_counts, interval
from quantcore.eval.frechet import Gaussian, fid_of_features, frechet_distance
from quantcore.eval.manifold import knn_radii, precision_recall
from quantcore.eval.quality import SampleSet, measure
from quantcore.eval.reference import ReferenceError, build_reference, load_reference, read_info


@pytest.fixture(scope="module")
def features():
    return inception.InceptionFeatures("cpu")


@pytest.fixture(scope="module")
def images():
    """Twelve 32x32 images with structure (gradients and blocks), not only noise."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 32)[None, :, None] * rng.uniform(0.2, 1.0, size=(12, 1, 3))
    blocks = (rng.uniform(size=(12, 4, 4, 3)) > 0.5).repeat(8, 1).repeat(8, 2) * 120
    return torch.from_numpy(np.clip(base[:, None] + blocks, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_features(features, images):
    """(pool, spatial) of all twelve images, computed in one batch."""
    return features(images)


def scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# -- the network --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_network_equals_the_wheels_torchscript_and_is_deterministic(features, images, image_features):
    pool, spatial = features(images[:3])
    assert pool.shape == (3, 2048) and spatial.shape == (3, inception.SPATIAL_DIM) == (3, 2023)
    # the same features again, and within float rounding in another batch (the fixture's 12)
    assert torch.equal(pool, features(images[:3])[0])
    assert torch.allclose(pool, image_features[0][:3], rtol=1e-5, atol=1e-6)
    scripted = torch.jit.load(str(inception.wheel_weights_path()), map_location="cpu")
    with torch.no_grad():
        expected = scripted(inception.network_input(images[:2]).contiguous())
    assert torch.allclose(pool[:2], expected, rtol=1e-4, atol=1e-5)


def test_spatial_features_are_mixed_6_conv_first_7_channels_in_tf_order(features, images, image_features):
    with torch.no_grad():
        _, mixed_6_conv = features.network(inception.network_input(images[:1]))
    h, w, c = 5, 11, 6
    assert mixed_6_conv.shape == (1, 192, 17, 17)
    assert image_features[1][0, (h * 17 + w) * 7 + c] == pytest.approx(
        float(mixed_6_conv[0, c, h, w]), rel=1e-5
    )


def test_tf_legacy_resize_reads_input_at_j_times_in_over_out():
    m = inception.resize_matrix(32, 299)
    assert torch.allclose(m.sum(1), torch.ones(299, dtype=torch.float64))
    assert torch.equal(inception.resize_matrix(299, 299), torch.eye(299, dtype=torch.float64))
    row = torch.arange(32, dtype=torch.float64)
    src = torch.arange(299, dtype=torch.float64) * 32 / 299
    assert torch.allclose(m @ row, src.clamp(max=31))  # linear input, clamped at the last pixel
    x = inception.network_input(torch.full((1, 7, 5, 3), 200, dtype=torch.uint8))
    assert x.shape == (1, 3, 299, 299) and torch.allclose(x, torch.tensor((200 - 128) / 128))


def test_unknown_or_missing_weight_files_are_refused(tmp_path, monkeypatch):
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the network")
    with pytest.raises(inception.InceptionError, match="not a known FID Inception file"):
        inception.read_weights(other)
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(tmp_path / "missing.safetensors"))
    with pytest.raises(inception.InceptionError, match="not found"):
        inception.InceptionFeatures("cpu")


def test_fp16_export_is_the_pinned_file_and_drifts_little(tmp_path, features, images):
    out = tmp_path / "fid-inception-fp16.safetensors"
    assert inception.export_fp16(out) == inception.FP16_SHA256
    half = inception.InceptionFeatures("cpu", path=out)
    a, b = features(images[:2])[0], half(images[:2])[0]
    assert (a - b).abs().max() / a.abs().max() < 5e-3


# -- Fréchet distance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_a", "n_b"), [(300, 400), (20, 30), (20, 400)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b):
    rng = np.random.default_rng(n_a + n_b)
    dim = 48
    mix = rng.normal(size=(dim, dim)) / 6
    a = rng.normal(size=(n_a, dim)) @ mix
    b = rng.normal(size=(n_b, dim)) @ mix * 1.4 + 0.3
    expected = scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got = fid_of_features(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(expected, rel=1e-6)
    from_moments = frechet_distance(
        Gaussian.from_moments(a.mean(0), np.cov(a, rowvar=False)),
        Gaussian.from_moments(b.mean(0), np.cov(b, rowvar=False)),
    )
    assert from_moments == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero(image_features):
    pool, spatial = image_features
    assert abs(fid_of_features(pool, pool)) < 1e-6 and abs(fid_of_features(spatial, spatial)) < 1e-6
    rng = np.random.default_rng(1)
    big = torch.from_numpy(rng.normal(size=(500, 40)))
    stats = Gaussian.of(big)
    assert abs(frechet_distance(stats, Gaussian.from_moments(stats.mu, stats.sigma))) < 1e-9


def test_weighted_statistics_equal_those_of_the_repeated_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 5))
    counts = bootstrap_counts(30, 1, seed=3)[0]
    repeated = np.repeat(x, counts.numpy().astype(int), axis=0)
    stats = Gaussian.of(torch.from_numpy(x), counts)
    assert np.allclose(stats.mu.numpy(), repeated.mean(0))
    assert np.allclose(stats.sigma.numpy(), np.cov(repeated, rowvar=False))


def test_too_few_rows_for_a_covariance_is_an_error():
    with pytest.raises(ConfigError, match="at least 2 feature rows"):
        Gaussian.of(torch.zeros(1, 4))


# -- precision / recall and bootstrap -----------------------------------------------------------------


def test_precision_recall_identical_sets_are_one_and_disjoint_sets_zero():
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.normal(size=(200, 16))).float()
    same = precision_recall(a, a.clone())
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(a, a + 100.0)
    assert far.precision == 0.0 and far.recall == 0.0
    # half of the samples on reference points, half far away: precision 1/2; the first 100 reference
    # points are covered exactly, the others only by the larger balls of the sparser half-set
    half = precision_recall(a, torch.cat([a[:100], a[100:] + 100.0]))
    assert half.precision == 0.5 and half.reference_inside_samples[:100].all() and 0.5 <= half.recall < 1


def test_knn_radius_is_the_third_neighbour_not_counting_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(points, k=3).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]  # squared distances
    with pytest.raises(ConfigError, match="more than 3 images"):
        knn_radii(points[:3])


def test_bootstrap_counts_draw_n_with_replacement_and_the_interval_brackets_the_value():
    counts = bootstrap_counts(50, 20, seed=0)
    assert counts.shape == (20, 50) and torch.all(counts.sum(1) == 50) and counts.max() > 1
    assert torch.equal(counts, bootstrap_counts(50, 20, seed=0))
    values = torch.linspace(0, 1, 50, dtype=torch.float64)
    lo, hi = interval(lambda w: float(w @ values / w.sum()), counts, 0.5, (0.0, 1.0))
    assert lo < 0.5 < hi and hi - lo < 0.4


def test_measure_reports_value_interval_fp_and_noise_floor(image_features):
    pool, spatial = image_features
    ref_stats_pool, ref_stats_spatial = Gaussian.of(pool[6:]), Gaussian.of(spatial[6:])
    from quantcore.eval.reference import Reference

    reference = Reference("test", 6, ref_stats_pool, ref_stats_spatial, pool[6:])
    labels, seeds = list(range(6)), list(range(6))

    def sample(rows):
        return SampleSet(labels, seeds, pool[rows], spatial[rows])

    fp, quantized, other = sample(slice(0, 6)), sample([0, 1, 2, 3, 4, 6]), sample([6, 7, 8, 9, 10, 11])
    result = measure(quantized, ["fid", "sfid", "precision", "recall", "fid_vs_fp"], reference, fp, other, 20)
    m = result["metrics"]
    assert set(m) == {"fid", "sfid", "precision", "recall", "fid_vs_fp"}
    assert m["fid"]["ci95"][0] <= m["fid"]["value"] <= m["fid"]["ci95"][1]
    assert m["fid"]["fp"] == pytest.approx(fid_of_features(pool[:6], pool[6:]))
    assert m["fid"]["noise_floor"] == pytest.approx(fid_of_features(pool[6:], pool[6:]), abs=1e-6)
    assert m["fid_vs_fp"]["value"] == pytest.approx(fid_of_features(pool[[0, 1, 2, 3, 4, 6]], pool[:6]))
    assert 0 <= m["precision"]["ci95"][0] <= m["precision"]["ci95"][1] <= 1
    assert "logits" in result["inception_score"]
    with pytest.raises(ConfigError, match="too few"):
        measure(SampleSet(labels[:3], seeds[:3], pool[:3], spatial[:3]), ["fid", "precision"], reference)
    with pytest.raises(ConfigError, match="need the FP model"):
        measure(quantized, ["fid_vs_fp"], reference)


# -- references ---------------------------------------------------------------------------------------


def test_an_adm_reference_batch_written_here_loads(tmp_path, features, images, image_features):
    """The ADM evaluator's format: arr_0 images and mu/sigma/mu_s/sigma_s (np.savez, as its files)."""
    pool, spatial = (f[:6] for f in image_features)
    path = tmp_path / "VIRTUAL_test_labeled.npz"
    np.savez(
        path,
        arr_0=images[:6].numpy(),
        mu=pool.double().mean(0).numpy(),
        sigma=np.cov(pool.double().numpy(), rowvar=False),
        mu_s=spatial.double().mean(0).numpy(),
        sigma_s=np.cov(spatial.double().numpy(), rowvar=False),
    )
    ref = load_reference(path, features, need_manifold=True)
    assert ref.num_images == 6 and ref.spatial is not None and ref.pool_features.shape == (6, 2048)
    assert torch.allclose(ref.pool_features, pool, rtol=1e-5, atol=1e-6)  # read from arr_0 in batches
    assert frechet_distance(Gaussian.of(pool), ref.pool) == pytest.approx(0, abs=1e-6)
    stats_only = tmp_path / "stats_only.npz"
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    assert load_reference(stats_only).spatial is None
    with pytest.raises(ReferenceError, match="no images"):
        load_reference(stats_only, features, need_manifold=True)


def test_build_reference_from_a_folder_and_from_an_npz_agree(tmp_path, features, images):
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(images[:4].numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    from_folder = build_reference(tmp_path / "images", tmp_path / "a.npz", features)
    np.savez(tmp_path / "images.npz", arr_0=images[:4].numpy())
    from_npz = build_reference(tmp_path / "images.npz", tmp_path / "b.npz", features)
    assert torch.equal(from_folder.pool.mu, from_npz.pool.mu)
    loaded = load_reference(tmp_path / "a.npz", need_manifold=True)  # stored features: no network
    assert torch.equal(loaded.pool_features, from_folder.pool_features)
    with np.load(tmp_path / "a.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 3) and np.array_equal(data["arr_0"], images[:4].numpy())
    assert read_info(tmp_path / "a.npz")["num_images"] == 4
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(folder / "odd.png")
    with pytest.raises(ReferenceError, match="share one size"):
        build_reference(tmp_path / "images", tmp_path / "c.npz", features)


def test_malformed_references_are_one_line_errors(tmp_path):
    with pytest.raises(ReferenceError, match="not found"):
        load_reference(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ReferenceError, match="not an .npz file"):
        load_reference(tmp_path / "text.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ReferenceError, match=r"expected \(2048,\)"):
        load_reference(tmp_path / "shapes.npz")
    np.savez(tmp_path / "other.npz", labels=np.arange(3))
    with pytest.raises(ReferenceError, match="no statistics"):
        load_reference(tmp_path / "other.npz")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ReferenceError, match=r"uint8 images \(N, H, W, 3\)"):
        load_reference(tmp_path / "gray.npz")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as archive:
        archive.writestr("mu.npy", b"\x93NUMPY\x01\x00" + json.dumps({}).encode())
        archive.writestr("sigma.npy", b"")
    with pytest.raises(ReferenceError, match="cannot be read"):
        load_reference(tmp_path / "cut.npz")
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ReferenceError, match="at least 2 images"):
        build_reference(tmp_path / "one.npz", tmp_path / "out.npz", features=None)
