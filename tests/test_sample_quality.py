"""Sample-quality measures on inputs with known answers, and the suite classifier's training and cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi

from ablation import classifier as C
from ablation import sample_quality as Q
from ablation.config import ConfigError
from ablation.data import ImageData, content_digest, load_images, to_unit_range
from ablation.synthetic import make_imagefolder


def gaussian_with_exact_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n rows whose sample mean and sample covariance (n − 1 denominator) are exactly `mean` and `cov`."""
    d = len(mean)
    z = np.random.default_rng(seed).normal(size=(n, d))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def normal(n: int = 600, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# ----------------------------------------------------------------------------- Fréchet distance


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_mean_shift():
    a = normal()
    assert abs(Q.frechet_distance(a, a)) < 1e-8
    shifts = [0.1, 0.3, 1.0, 3.0]
    fds = [Q.frechet_distance(a, a + s) for s in shifts]
    assert all(x < y for x, y in zip(fds, fds[1:]))
    # Equal covariances: FD is exactly the squared mean shift, d·s².
    assert np.allclose(fds, [a.shape[1] * s * s for s in shifts], rtol=1e-6)


def test_fd_of_two_gaussians_matches_the_closed_form():
    # Commuting covariances Σa = R diag(va) Rᵀ, Σb = R diag(vb) Rᵀ:
    # FD = ‖μa − μb‖² + Σᵢ (√vaᵢ − √vbᵢ)².
    rng = np.random.default_rng(1)
    d = 5
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    va, vb = rng.uniform(0.5, 3.0, d), rng.uniform(0.5, 3.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    a = gaussian_with_exact_moments(400, mu_a, rot @ np.diag(va) @ rot.T, seed=2)
    b = gaussian_with_exact_moments(300, mu_b, rot @ np.diag(vb) @ rot.T, seed=3)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert Q.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fd_of_non_commuting_covariances_matches_the_trace_formula():
    # Σa = diag(4, 1) and Σb = [[1, .5], [.5, 1]] do not commute, so (ΣaΣb)^½ is not symmetric.
    sa, sb = np.diag([4.0, 1.0]), np.array([[1.0, 0.5], [0.5, 1.0]])
    a = gaussian_with_exact_moments(200, np.zeros(2), sa, seed=4)
    b = gaussian_with_exact_moments(200, np.zeros(2), sb, seed=5)
    # Tr((ΣaΣb)^½) = Tr((Σa^½ Σb Σa^½)^½), computed by eigenvalues of the symmetric form.
    half = np.diag(np.sqrt(np.diag(sa)))
    expected = np.trace(sa) + np.trace(sb) - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(half @ sb @ half)))
    assert Q.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fd_survives_a_singular_covariance():
    a = normal(300, 6)
    a[:, 0] = 0.0  # a dead feature, as a ReLU unit that never fires on blurry samples
    value = Q.frechet_distance(a, normal(300, 6, seed=1))
    assert np.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- kernel distance


def test_mmd2_unbiased_matches_the_double_sum():
    x, y = normal(7, 3, seed=1), normal(7, 3, seed=2) + 0.5

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert Q.mmd2_unbiased(x, y) == pytest.approx(within - 2 * cross, rel=1e-10)


def test_kid_of_a_set_with_itself_is_near_zero_and_grows_with_a_mean_shift():
    # The unbiased estimate of a set against itself scatters around 0 by about 2·E[k(x, x)]/m
    # (negative here); "near zero" is judged against the KID of a small shift of 0.3 per feature.
    a = normal(1000)
    kids = [Q.kernel_distance(a, a + s, subset_size=250, subsets=20) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert abs(kids[0]) < 0.1 * kids[2]
    assert all(x < y for x, y in zip(kids, kids[1:]))
    # Another draw of the same distribution is also near 0.
    assert abs(Q.kernel_distance(a, normal(1000, seed=9), subset_size=250, subsets=20)) < 0.1 * kids[2]


def test_kid_is_seeded():
    a, b = normal(300), normal(300, seed=1) + 0.2
    assert Q.kernel_distance(a, b, 100, 5, seed=3) == Q.kernel_distance(a, b, 100, 5, seed=3)


# ----------------------------------------------------------------------------- precision and recall


def test_precision_recall_of_identical_sets_is_one():
    a = normal(300)
    assert Q.precision_recall(a, a.copy()) == (1.0, 1.0)


def test_precision_recall_fall_as_the_samples_move_away():
    real = normal(400, 4)
    fake = normal(400, 4, seed=1)
    values = [Q.precision_recall(real, fake + s) for s in (0.0, 0.5, 1.0, 2.0, 50.0)]
    precisions, recalls = zip(*values)
    assert all(x > y for x, y in zip(precisions, precisions[1:]))
    assert all(x > y for x, y in zip(recalls, recalls[1:]))
    assert precisions[-1] == 0.0 and recalls[-1] == 0.0


def test_samples_covering_one_of_two_modes_have_full_precision_and_half_recall():
    mode_a, mode_b = normal(200, 4, seed=1), normal(200, 4, seed=2) + 100.0
    real = np.concatenate([mode_a, mode_b])
    precision, recall = Q.precision_recall(real, mode_a.copy())
    assert precision == 1.0 and recall == 0.5


def test_distances_reject_mismatched_arrays():
    with pytest.raises(ValueError, match="same d"):
        Q.frechet_distance(normal(10, 3), normal(10, 4))
    with pytest.raises(ValueError, match="at least"):
        Q.precision_recall(normal(3, 2), normal(3, 2))


# ----------------------------------------------------------------------------- the suite classifier


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> ImageData:
    root = make_imagefolder(tmp_path_factory.mktemp("sq") / "tiny", n_train=64, n_test=32)
    return load_images(root, cache_dir=tmp_path_factory.mktemp("sq-decoded"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sq-classifier")


@pytest.fixture(scope="module")
def tiny_classifier(tiny_data, cache_dir) -> C.SuiteClassifier:
    return C.load_or_train(tiny_data, cache_dir, epochs=1)


TRAIN = C.train_classifier


class Counter:
    """Stands in for train_classifier (through monkeypatch) and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return TRAIN(*args, **kwargs)


def test_classifier_trains_on_a_tiny_dataset_and_embeds_images(tiny_classifier, tiny_data):
    assert tiny_classifier.trained and tiny_classifier.path.exists()
    assert 0.0 <= tiny_classifier.accuracy <= 1.0
    feats = tiny_classifier.features(tiny_data.test_x)
    assert feats.shape == (32, C.ClassifierSettings().widths[-1]) == (32, tiny_classifier.feature_dim)
    assert feats.dtype == np.float64 and np.isfinite(feats).all()
    # A [-1, 1] float copy of the same images is quantized back to the same uint8 images.
    assert np.array_equal(tiny_classifier.features(to_unit_range(tiny_data.test_x)), feats)


def test_classifier_training_is_deterministic(tiny_data):
    settings = C.ClassifierSettings(epochs=1)
    state = torch.get_rng_state()
    (net1, acc1), (net2, acc2) = C.train_classifier(tiny_data, settings), C.train_classifier(tiny_data, settings)
    assert acc1 == acc2
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in net1.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as it was


def test_cached_classifier_is_loaded_not_retrained(tiny_classifier, tiny_data, cache_dir, monkeypatch):
    counter = Counter()
    monkeypatch.setattr(C, "train_classifier", counter)
    again = C.load_or_train(tiny_data, cache_dir, epochs=1)
    assert counter.calls == 0 and not again.trained
    assert again.path == tiny_classifier.path and again.accuracy == tiny_classifier.accuracy
    assert np.array_equal(again.features(tiny_data.test_x), tiny_classifier.features(tiny_data.test_x))


def test_other_data_or_settings_get_a_new_cache_file(tiny_classifier, tiny_data, cache_dir, monkeypatch):
    counter = Counter()
    monkeypatch.setattr(C, "train_classifier", counter)
    changed_x = tiny_data.train_x.clone()
    changed_x[0, 0, 0, 0] ^= 1  # one bit of one pixel
    changed = ImageData(changed_x, tiny_data.train_y, tiny_data.test_x, tiny_data.test_y, tiny_data.classes)
    other = C.load_or_train(changed, cache_dir, epochs=1)
    assert counter.calls == 1 and other.trained and other.path != tiny_classifier.path and other.path.exists()
    renamed = ImageData(*(getattr(tiny_data, k) for k in ("train_x", "train_y", "test_x", "test_y")),
                        [f"{c}-x" for c in tiny_data.classes])
    assert C.load_or_train(renamed, cache_dir, epochs=1).path not in (tiny_classifier.path, other.path)
    assert C.load_or_train(tiny_data, cache_dir, epochs=2).path != tiny_classifier.path
    assert counter.calls == 3
    assert tiny_classifier.path.exists()  # the first file is untouched


def test_corrupt_cache_file_is_retrained_over(tiny_data, tmp_path, monkeypatch):
    path = C.cache_path(tmp_path, content_digest(tiny_data), C.ClassifierSettings(epochs=1))
    path.write_bytes(b"not a torch file")
    counter = Counter()
    monkeypatch.setattr(C, "train_classifier", counter)
    fresh = C.load_or_train(tiny_data, tmp_path, epochs=1)
    assert counter.calls == 1 and fresh.path == path
    assert not C.load_or_train(tiny_data, tmp_path, epochs=1).trained  # the rewritten file now loads


# ----------------------------------------------------------------------------- measure


def test_measure_without_inception(tiny_classifier, tiny_data):
    samples = to_unit_range(tiny_data.test_x.flip(-1))  # float [-1, 1], as the VAE's samples come
    out = Q.measure(tiny_classifier, samples, tiny_data.test_x)
    assert set(out) == {"fd_suite", "kid_suite", "precision_suite", "recall_suite", "classifier_acc",
                        "fid_inception", "kid_inception", "measures_skipped"}
    assert out["fd_suite"] > 0 and np.isfinite(out["kid_suite"])
    assert 0 <= out["precision_suite"] <= 1 and 0 <= out["recall_suite"] <= 1
    assert out["classifier_acc"] == tiny_classifier.accuracy
    assert out["fid_inception"] is None and out["kid_inception"] is None
    assert set(out["measures_skipped"]) == {"fid_inception", "kid_inception"}
    assert "eval.inception_weights" in out["measures_skipped"]["fid_inception"]
    same = Q.measure(tiny_classifier, tiny_data.test_x, tiny_data.test_x)
    assert abs(same["fd_suite"]) < 1e-6 and same["precision_suite"] == same["recall_suite"] == 1.0


def test_measure_needs_as_many_samples_as_real_images(tiny_classifier, tiny_data):
    with pytest.raises(ValueError, match="as many"):
        Q.measure(tiny_classifier, tiny_data.test_x[:10], tiny_data.test_x)


def test_missing_inception_weights_name_the_path_and_the_fix(tiny_classifier, tiny_data, tmp_path):
    missing = tmp_path / "no-such-inception.pth"
    with pytest.raises(ConfigError, match="eval.inception_weights=.*no-such-inception.pth.*does not exist") as err:
        Q.measure(tiny_classifier, tiny_data.test_x, tiny_data.test_x, inception_weights=missing)
    assert "eval.inception_weights=null" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no-such-inception.pth"):
        Q.check_inception_weights(missing)  # the same check, cheap enough for a run's start
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ConfigError, match="garbage.pth cannot be loaded as Inception-v3 weights") as err:
        Q.inception_extractor(garbage)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)  # a torch file, but not Inception-v3's state dict
    with pytest.raises(ConfigError, match="foreign.pth cannot be loaded as Inception-v3 weights") as err:
        Q.inception_extractor(foreign)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def fake_inception_weights(tmp_path_factory):
    """A weights file of a randomly initialized Inception-v3 of torch-fidelity's layout (no download:
    the URL loader and the state-dict load are replaced while the random network is built)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "fake-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_measure_with_local_inception_weights(tiny_classifier, tiny_data, fake_inception_weights):
    real = tiny_data.test_x[:4]
    samples = to_unit_range(tiny_data.test_x[4:8])
    out = Q.measure(tiny_classifier, samples, real, inception_weights=fake_inception_weights)
    assert out["measures_skipped"] == {}
    assert np.isfinite(out["fid_inception"]) and out["fid_inception"] > 0
    assert np.isfinite(out["kid_inception"])
