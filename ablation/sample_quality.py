"""Sample quality: how far the VAE's prior samples lie from real test images, in a feature space.

The distances are pure functions of two feature arrays, a [N, d] (generated) and b [M, d] (real):

    frechet_distance     FD = ‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)                     lower = closer
    kernel_distance      unbiased MMD² with k(x, y) = (xᵀy/d + 1)³, mean over subsets     lower = closer
    precision_recall     k-NN precision and recall (Kynkäänniemi et al. 2019, k = 3)      higher = closer

`measure` computes them in the features of the suite's own classifier (`ablation.classifier`),
keys *_suite. These are not FID/KID: the feature space is a small network trained on the same
dataset, so the numbers are comparable between runs of this suite only. Its label is
"FD (suite classifier)". When a local Inception-v3 weights file is configured
(`eval.inception_weights`), `measure` adds FID and KID in Inception's 2048-d pool features,
extracted by torch-fidelity (its TF1-compatible bilinear resize to 299×299) and computed by
torch-fidelity's own FID and KID functions; nothing is ever downloaded.

Skipped measures: every key is always present. A measure not computed is null, and the
`measures_skipped` entry maps its key to the reason, e.g.
    {"fid_inception": null, "measures_skipped": {"fid_inception": "eval.inception_weights is null ..."}}
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

from .classifier import SuiteClassifier, as_uint8
from .config import ConfigError

KID_SUBSET_SIZE = 1000  # images per KID subset (fewer when a set is smaller), as torch-fidelity and the KID paper
KID_SUBSETS = 100  # subsets averaged
KID_SEED = 0  # fixes the subsets, the same for every run
PR_K = 3  # neighbourhood size of the k-NN manifolds
FD_EPS = 1e-6  # added to both covariances' diagonals when (ΣaΣb)^½ is not finite
FD_IMAG_ATOL = 1e-3  # largest imaginary part on the diagonal of (ΣaΣb)^½ accepted as rounding
INCEPTION_BATCH = 50
INCEPTION_FIX = ("point eval.inception_weights at a local copy of torch-fidelity's Inception-v3 weights "
                 "(weights-inception-2015-12-05-6726825d.pth), or set eval.inception_weights=null to skip FID/KID")
SKIPPED_NO_WEIGHTS = "eval.inception_weights is null: no local Inception-v3 weights file, so no FID/KID"
INCEPTION_KEYS = ("fid_inception", "kid_inception")


# ----------------------------------------------------------------------------- distances of feature arrays


def _check_pair(a: np.ndarray, b: np.ndarray, least: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature arrays must be [N, d] with the same d, not {a.shape} and {b.shape}")
    if min(len(a), len(b)) < least:
        raise ValueError(f"need at least {least} feature vectors per set, got {len(a)} and {len(b)}")
    return a, b


def _sqrtm_product(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """(ΣaΣb)^½, as pytorch-fid computes it: retried with FD_EPS on both diagonals when not finite, and its
    real part when the imaginary parts are rounding (diagonal within FD_IMAG_ATOL); ValueError otherwise."""
    with warnings.catch_warnings():  # a singular product is expected (dead features, N < d) and handled here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sa @ sb)
        if not np.isfinite(root).all():
            offset = np.eye(sa.shape[0]) * FD_EPS
            root = scipy.linalg.sqrtm((sa + offset) @ (sb + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=FD_IMAG_ATOL):
            raise ValueError(f"(ΣaΣb)^½ has an imaginary part of {np.max(np.abs(root.imag)):.3g} on its diagonal")
        root = root.real
    return root


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, d] and b [M, d].

        FD = ‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)

    μ the mean, Σ the sample covariance (N − 1 denominator). 0 for identical statistics; lower =
    closer. In squared feature units. Biased upwards for small N; compare values at equal N.
    """
    a, b = _check_pair(a, b, 2)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(_sqrtm_product(sa, sb)))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy/d + 1)³ for every pair of rows: the KID kernel, [len(x), len(y)]."""
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k  # two products: far faster than a float power


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two sets of m vectors each, with `polynomial_kernel`:

        MMD² = Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(m(m−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ)/m²

    Its expectation is 0 when x and y come from one distribution, so an estimate can be slightly negative.
    """
    m = len(x)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_distance(a: np.ndarray, b: np.ndarray, subset_size: int = KID_SUBSET_SIZE, subsets: int = KID_SUBSETS,
                    seed: int = KID_SEED) -> float:
    """KID-style kernel distance: the mean of `mmd2_unbiased` over `subsets` pairs of random subsets.

    Each pair draws m = min(subset_size, N, M) rows of a and of b without replacement, from a generator
    seeded by `seed`. ≈ 0 when a and b come from one distribution (it can be slightly negative); lower =
    closer. Unbiased in the sample size, unlike FD, so values at different N compare.
    """
    a, b = _check_pair(a, b, 2)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values))


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """‖xᵢ − yⱼ‖² for every pair of rows, clipped at 0 against rounding."""
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T), 0.0)


def knn_radii(x: np.ndarray, k: int = PR_K, block: int = 1000) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row of x: the radii of the k-NN balls.

    The k-th nearest neighbour other than the point itself is the (k+1)-th smallest distance, the
    point's own 0 being the first (a duplicate of the point counts as a neighbour at distance 0).
    """
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {len(x)}")
    return np.concatenate([np.partition(_squared_distances(x[s:s + block], x), k, axis=1)[:, k]
                           for s in range(0, len(x), block)])


def manifold_coverage(query: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, block: int = 1000) -> float:
    """Fraction of query rows inside the union of the reference balls: ∃ j with ‖q − refⱼ‖² ≤ ref_radiiⱼ."""
    inside = [(_squared_distances(query[s:s + block], ref) <= ref_radii[None, :]).any(axis=1)
              for s in range(0, len(query), block)]
    return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features `fake` against `real`.

        precision = (1/|fake|) Σ_{g ∈ fake} 1[∃ r ∈ real: ‖g − r‖ ≤ NN_k(r, real)]
        recall    = (1/|real|) Σ_{r ∈ real} 1[∃ g ∈ fake: ‖r − g‖ ≤ NN_k(g, fake)]

    NN_k(x, S) is the distance from x to its k-th nearest neighbour in S other than itself. Precision:
    how many samples look real (fidelity); recall: how much of the real data the samples cover
    (diversity). Both in [0, 1]; higher = better; 1 and 1 for identical sets.
    """
    real, fake = _check_pair(real, fake, k + 1)
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


# ----------------------------------------------------------------------------- Inception-v3 (optional)


def check_inception_weights(weights: str | os.PathLike) -> Path:
    """The weights path, expanded; ConfigError (one line naming the path and the fix) when it is not a file.

    Cheap: call it when a run starts, so a wrong path fails before training rather than after.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.inception_weights={path} does not exist or is not a file; {INCEPTION_FIX}.")
    return path


def inception_extractor(weights: str | os.PathLike, device: torch.device | str = "cpu"
                        ) -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3 with the local weights file `weights`, emitting the 2048-d pool features.

    Raises ConfigError (one line naming the path and the fix) when the file is missing or cannot be loaded.
    torch-fidelity reads the file with torch.load(weights_only=False): point it only at a file you trust.
    """
    path = check_inception_weights(weights)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as exc:  # torch.load and load_state_dict raise several types for a foreign file
        raise ConfigError(f"eval.inception_weights={path} cannot be loaded as Inception-v3 weights "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"{INCEPTION_FIX}.") from exc
    return net.to(torch.device(device)).eval()


@torch.inference_mode()
def inception_features(extractor: FeatureExtractorInceptionV3, images: torch.Tensor) -> torch.Tensor:
    """Pool features [N, 2048] (float32, CPU) of images (uint8, or float in [-1, 1], quantized by `as_uint8`).

    The extractor resizes each image to 299×299 itself, as torch-fidelity does for FID.
    """
    device = next(extractor.parameters()).device
    out = [extractor(as_uint8(images[s:s + INCEPTION_BATCH]).to(device))[0].float().cpu()
           for s in range(0, images.shape[0], INCEPTION_BATCH)]
    return torch.cat(out)


def inception_measures(samples: torch.Tensor, real: torch.Tensor, extractor: FeatureExtractorInceptionV3) -> dict:
    """fid_inception and kid_inception of samples against real, by torch-fidelity's FID and KID functions.

    KID uses subsets of min(KID_SUBSET_SIZE, N) images, KID_SUBSETS of them, seeded by KID_SEED.
    """
    fa, fb = inception_features(extractor, samples), inception_features(extractor, real)
    fid = fid_statistics_to_metric(fid_features_to_statistics(fa), fid_features_to_statistics(fb), verbose=False)
    kid = kid_features_to_metric(fa, fb, kid_subset_size=min(KID_SUBSET_SIZE, len(fa), len(fb)),
                                 kid_subsets=KID_SUBSETS, rng_seed=KID_SEED, verbose=False)
    return {"fid_inception": float(fid[KEY_METRIC_FID]), "kid_inception": float(kid[KEY_METRIC_KID_MEAN])}


# ----------------------------------------------------------------------------- all measures of one run


def suite_measures(fake: np.ndarray, real: np.ndarray) -> dict:
    """fd_suite, kid_suite, precision_suite and recall_suite of feature arrays fake and real."""
    precision, recall = precision_recall(real, fake)
    return {"fd_suite": frechet_distance(fake, real), "kid_suite": kernel_distance(fake, real),
            "precision_suite": precision, "recall_suite": recall}


def measure(classifier: SuiteClassifier, samples: torch.Tensor, real: torch.Tensor,
            inception_weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> dict:
    """The sample-quality measures of `samples` (the VAE's prior samples) against `real` (test images).

    Both [N, 3, H, W], uint8 or float in [-1, 1], of equal count. Returns fd_suite, kid_suite,
    precision_suite, recall_suite and classifier_acc (the classifier's test accuracy), and
    fid_inception and kid_inception when `inception_weights` names a local weights file (on `device`);
    otherwise those two are None and `measures_skipped` says why.
    """
    if samples.shape[0] != real.shape[0]:
        raise ValueError(f"samples and real images must be as many; got {samples.shape[0]} and {real.shape[0]}")
    extractor = inception_extractor(inception_weights, device) if inception_weights is not None else None
    out = suite_measures(classifier.features(samples), classifier.features(real))
    out["classifier_acc"] = classifier.accuracy
    if extractor is None:
        out |= dict.fromkeys(INCEPTION_KEYS)
        out["measures_skipped"] = dict.fromkeys(INCEPTION_KEYS, SKIPPED_NO_WEIGHTS)
    else:
        out |= inception_measures(samples, real, extractor)
        out["measures_skipped"] = {}
    return out
