"""End-of-run measures, one or more for each claim of the seed report, as pure functions.

Each function takes tensors or arrays (and, for the likelihood bound, a model with the VAE's
`encode`/`decode`/`noise_scale` interface) and returns per-image values or one number; the
passes over a dataset that feed them live in `ablation/evaluate.py`. Images are on the [0, 1]
scale unless a name says otherwise; D = C*H*W.

    claim                         measure (direction)
    lower reconstruction loss     recon_mean, psnr_mean (higher = better), ssim (higher = better)
    sharper reconstructions       hf_energy and laplacian_variance ratios against the originals
                                  (closer to 1 = better; below 1 = blurrier than the data)
    more structured latent space  kl_per_dim -> kl_spectrum, active_units_kl, knn_probe
    better generated images       the same sharpness ratios for prior samples against real images
    (a beta-independent fit)      iw_log_likelihood: an importance-weighted bound on log p(x)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pytorch_msssim import ssim
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .objective import gaussian_nll_from_sse, recon_per_image

HF_CUTOFF = 0.25  # cycles/pixel: spectral rings strictly above it count as high frequency (8 cycles per 32 px)
KL_ACTIVE_NATS = 0.01  # a latent is active when its mean KL over the test set exceeds this
KNN_K = 10  # neighbours of the k-NN probe
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


# ----------------------------------------------------------------------------- reconstruction

def to_01(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (the Tanh output and `to_unit_range`) or uint8 [0, 255] -> float [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return (x.float() + 1.0) / 2.0


def mse01(sse_per_image: float, dims: int) -> float:
    """Per-pixel MSE on the [0, 1] scale from an SSE per image on the [-1, 1] scale: SSE / (4*D).

    Halving the scale quarters a squared error. Lower = better.
    """
    return sse_per_image / (4.0 * dims)


def psnr(mse: float) -> float:
    """10*log10(1 / mse) in dB, for a per-pixel MSE on the [0, 1] scale (peak 1). Higher = better."""
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def ssim_per_image(x_hat01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair, [0, 1] images, from pytorch-msssim: data_range=1, 11x11 Gaussian window
    (sigma 1.5), K = (0.01, 0.03), the SSIM map averaged over valid positions and channels.

    SSIM = l*c*s, (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
    in each window; 1 for identical images. Higher = better.
    """
    return ssim(x_hat01.float(), x01.float(), data_range=1.0, size_average=False)


# ----------------------------------------------------------------------------- sharpness

def _ring_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    """For each 2-D FFT frequency (row-major, h*w), the index of its ring: round(radius * min(h, w)),
    radius = sqrt(fy^2 + fx^2) in cycles/pixel, so ring r has radius r / min(h, w)."""
    fy = torch.fft.fftfreq(h, device=device).view(h, 1)
    fx = torch.fft.fftfreq(w, device=device).view(1, w)
    return torch.round(torch.sqrt(fy ** 2 + fx ** 2) * min(h, w)).long().flatten()


def radial_power_spectrum(x01: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum of each image, [N, rings], summed over channels.

    Per channel: P(f) = |FFT2(x - mean(x))|^2 / (H*W) (by Parseval, P sums to the channel's energy
    about its mean); P is averaged over the frequencies of each ring of `_ring_index` and summed
    over channels.
    """
    n, c, h, w = x01.shape
    x = x01.float() - x01.float().mean(dim=(-2, -1), keepdim=True)
    power = (torch.fft.fft2(x).abs() ** 2 / (h * w)).sum(1).flatten(1)  # [N, H*W]
    ring = _ring_index(h, w, x01.device)
    counts = torch.bincount(ring).to(power.dtype)
    sums = torch.zeros(n, counts.numel(), dtype=power.dtype, device=power.device).index_add_(1, ring, power)
    return sums / counts


def hf_energy(x01: torch.Tensor, cutoff: float = HF_CUTOFF) -> torch.Tensor:
    """High-frequency spectral energy of each image: the radially averaged power spectrum
    (`radial_power_spectrum`, mean-removed [0, 1] images, channels summed) summed over the rings of
    radius > `cutoff` cycles/pixel (default 0.25, i.e. above half the Nyquist frequency).

    A set's sharpness is its mean over images divided by that of a reference set (see `ratio`):
    1 = as much fine detail as the reference, below 1 = blurrier, above 1 = noisier.
    """
    spectrum = radial_power_spectrum(x01)
    radius = torch.arange(spectrum.shape[1], device=spectrum.device) / min(x01.shape[-2:])
    return spectrum[:, radius > cutoff].sum(1)


def laplacian_variance(x01: torch.Tensor) -> torch.Tensor:
    """Variance over pixels of the 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of each image's grey level
    (0.299 R + 0.587 G + 0.114 B; a single channel is its own grey), valid positions only.

    A checkerboard of amplitude a gives 64 a^2. As with `hf_energy`, a set's mean over that of a
    reference set: 1 = as sharp as the reference, below 1 = blurrier.
    """
    x = x01.float()
    if x.shape[1] == 3:
        x = sum(wt * x[:, i] for i, wt in enumerate(GREY_WEIGHTS)).unsqueeze(1)
    kernel = torch.tensor(LAPLACIAN, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(x, kernel).flatten(1).var(dim=1, unbiased=False)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (a reference without any detail)."""
    return numerator / denominator if denominator != 0 else float("nan")


# ----------------------------------------------------------------------------- latent space

def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_j, sigma_j^2) || N(0, 1)) of each latent j of each image, [N, L], in nats:
    0.5 * (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1). Summed over j it is the objective's KL per image."""
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0)


def kl_spectrum(kl_dims_mean: torch.Tensor) -> list[float]:
    """The mean KL of each latent over a set of images (nats), sorted in descending order.

    It sums to the mean KL per image. A few large entries and many near 0 = a few used latents;
    a flat spectrum = information spread over all of them. Not better or worse in itself.
    """
    return torch.sort(kl_dims_mean.double().flatten(), descending=True).values.tolist()


def active_units_kl(spectrum: list[float], threshold: float = KL_ACTIVE_NATS) -> int:
    """Number of latents whose mean KL exceeds `threshold` nats (default 0.01): the latents that carry
    information about x (a collapsed latent has q(z_j|x) = N(0, 1), KL 0). Higher = more latents used."""
    return int(sum(v > threshold for v in spectrum))


def knn_probe(train_mu: np.ndarray, train_y: np.ndarray, test_mu: np.ndarray, test_y: np.ndarray,
              k: int = KNN_K) -> float:
    """Test accuracy of a k-NN classifier (k = 10, Euclidean, uniform votes) on standardized posterior
    means (StandardScaler fit on the train features): the fraction of test images whose k nearest
    train images mostly share their class. Local class structure of the latent space; higher = better,
    chance = 1 / classes."""
    if len(np.unique(train_y)) < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(k, len(train_y))))
    probe.fit(train_mu, train_y)
    return float(probe.score(test_mu, test_y))


# ----------------------------------------------------------------------------- likelihood

def iw_log_likelihood(model, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance-weighted lower bound (IWAE) on log p(x) of each image in `x` ([-1, 1] scale), float64 [N].

        log p(x) >= L_k(x) = log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x) iid

    (in expectation over the z_i; L_k is non-decreasing in k and tends to log p(x)). -L_k in nats per
    image is an upper bound on -log p(x): lower = better, comparable across beta.
      proposal  q(z|x) = N(mu, (noise_scale * sigma)^2), sigma = exp(logvar / 2): z exactly as training
                draws it (model.noise_scale; 1.0 is the textbook posterior)
      prior     p(z) = N(0, I)
      decoder   p(x|z) = N(x; decode(z), 1/2 I) on the [-1, 1] scale, so -log p(x|z) = SSE + (D/2) log pi
                (`objective.gaussian_nll_from_sse`, the density whose NLL is the training SSE)
    At k = 1 and noise_scale = 1 its expectation is the ELBO. The k draws come from `generator`
    (one [N, L] normal draw per importance sample), the weights are summed in float64 with log-sum-exp.
    """
    if model.noise_scale <= 0:
        raise ValueError(f"noise_scale={model.noise_scale}: the importance-weighted bound needs a proposal "
                         "with positive variance")
    mu, logvar = (t.float() for t in model.encode(x))
    std = model.noise_scale * torch.exp(0.5 * logvar)
    log_std = math.log(model.noise_scale) + 0.5 * logvar.double()
    dims = x[0].numel()
    log_w = torch.empty(x.shape[0], k, dtype=torch.float64, device=x.device)
    for i in range(k):
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * std
        log_px_z = -gaussian_nll_from_sse(recon_per_image(model.decode(z), x).double(), dims)
        # log p(z) - log q(z|x): the (L/2) log 2 pi of the two normal densities cancel
        log_pz_qz = (-0.5 * z.double() ** 2 + 0.5 * eps.double() ** 2 + log_std).sum(1)
        log_w[:, i] = log_px_z + log_pz_qz
    return torch.logsumexp(log_w, dim=1) - math.log(k)
