"""The end-of-run measures, each against a known answer: a closed form, an independent computation,
or an input built to have the answer (a blurred copy, a planted active latent, a linear-Gaussian
model whose likelihood is known)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from ablation.evaluate import final_metrics, linear_probe, prior_samples, inference_copy
from ablation.measures import (active_units_kl, hf_energy, iw_log_likelihood, kl_per_dim, kl_spectrum, knn_probe,
                               laplacian_variance, psnr, radial_power_spectrum, ssim_per_image)
from ablation.model import VAE, VAEConfig, VAEOutput
from ablation.objective import bits_per_dim, kl_per_image

D = 3 * 32 * 32


def textured_images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """[0, 1] images with detail at every scale: smooth colour fields plus pixel-level noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear")
    return (0.7 * coarse + 0.3 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur per channel, edges replicated."""
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return nn.functional.avg_pool2d(padded, 3, stride=1)


# ----------------------------------------------------------------------------- sharpness

def test_a_blurred_copy_is_less_sharp_and_an_image_is_as_sharp_as_itself():
    x = textured_images()
    for detail in (hf_energy, laplacian_variance):
        assert detail(x).mean() / detail(x).mean() == 1.0
        assert detail(blur(x)).mean() / detail(x).mean() < 0.5, detail.__name__
        assert detail(blur(blur(x))).mean() < detail(blur(x)).mean(), detail.__name__


def test_hf_energy_of_cosines_below_and_above_the_cutoff():
    """A cosine of amplitude a at 12 cycles per 32 px (0.375 cycles/pixel) has energy a^2 HW/2 about its
    mean, all in its ring (radius 12/32), whose mean power is that over the ring's frequency count; one at
    4 cycles (0.125) has none above 0.25 cycles/pixel."""
    a, cols = 0.3, torch.arange(32.0)
    high = (0.5 + a * torch.cos(2 * math.pi * 12 * cols / 32)).expand(1, 3, 32, 32)
    low = (0.5 + a * torch.cos(2 * math.pi * 4 * cols / 32)).expand(1, 3, 32, 32)
    f = np.fft.fftfreq(32)
    ring12 = int((np.round(np.hypot(*np.meshgrid(f, f)) * 32) == 12).sum())
    expected = 3 * (a ** 2 * 32 * 32 / 2) / ring12  # three equal channels
    assert hf_energy(high).item() == pytest.approx(expected, rel=1e-5)
    assert hf_energy(low).item() == pytest.approx(0.0, abs=1e-9)
    # Parseval: the ring means times the ring sizes give back the energy about the mean
    x = textured_images(2)
    ring_sizes = torch.bincount(torch.from_numpy(np.round(np.hypot(*np.meshgrid(f, f)) * 32).astype(np.int64).ravel()))
    energy = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2).sum(dim=(1, 2, 3))
    assert torch.allclose((radial_power_spectrum(x) * ring_sizes).sum(1), energy, rtol=1e-5)


def test_laplacian_variance_of_a_checkerboard_is_64_a_squared():
    a = 0.2
    board = 0.5 + a * (1 - 2 * ((torch.arange(32).view(32, 1) + torch.arange(32)) % 2)).float()
    assert laplacian_variance(board.expand(2, 3, 32, 32)).tolist() == pytest.approx([64 * a ** 2] * 2, rel=1e-5)
    assert laplacian_variance(torch.full((1, 3, 32, 32), 0.7)).item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- reconstruction

def test_ssim_is_1_for_an_image_with_itself_and_falls_with_noise():
    x = textured_images(8)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(8), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [ssim_per_image((x + s * noise).clamp(0, 1), x).mean().item() for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:])) and scores[0] < 1, scores


def test_psnr_and_bits_per_dim_against_hand_computations():
    assert psnr(0.01) == pytest.approx(20.0) and psnr(1.0) == 0.0 and psnr(0.0) == math.inf
    # a uniform density on [-1, 1]^D (-log p = D log 2) is uniform on [0, 255] per dim: log2(255) bits/dim
    assert bits_per_dim(D * math.log(2), D) == pytest.approx(math.log2(255))
    # a unit-scale Gaussian density on [-1, 1] is 127.5 times wider on 0..255: + log2(127.5) bits/dim
    assert bits_per_dim(0.0, D) == pytest.approx(math.log2(127.5))


class ConstantDecoder(nn.Module):
    """A stand-in VAE whose decoder returns one grey level whatever z: every reconstruction error is known.

    encode: mu = the first `latent_dim` pixel values, logvar = 0.
    """

    def __init__(self, level: float, latent_dim: int = 4, noise_scale: float = 0.3) -> None:
        super().__init__()
        self.level, self.latent_dim, self.noise_scale = level, latent_dim, noise_scale
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def encode(self, x):
        mu = x.flatten(1)[:, :self.latent_dim].float()
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return torch.full((z.shape[0], 3, 32, 32), self.level) + 0 * self.anchor

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        return VAEOutput(self.decode(mu), mu, logvar)


def small_final_metrics(model, test_x, test_y, train_x, train_y, **kw) -> dict:
    settings = dict(iw_samples=4, iw_images=None, sample_images=64, seed=0) | kw
    return final_metrics(model, test_x, test_y, train_x, train_y, beta=1.0, batch_size=50, **settings)


def test_final_recon_mse_psnr_and_gen_gap_of_a_reconstruction_with_known_error():
    """Decoded images are a flat 0.25 on the [0, 1] scale: test images far from it, train images close.
    MSE, PSNR and the gap are computed here directly from the pixels."""
    g = torch.Generator().manual_seed(0)
    test_x = torch.randint(0, 256, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    train_x = torch.randint(60, 70, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(120) % 4
    m = small_final_metrics(ConstantDecoder(level=-0.5), test_x, y, train_x, y)
    mse_test = np.mean((0.25 - test_x.numpy() / 255.0) ** 2)
    mse_train = np.mean((0.25 - train_x.numpy() / 255.0) ** 2)
    assert m["mse01"] == pytest.approx(mse_test, rel=1e-5)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / mse_test), abs=1e-4)
    assert m["psnr_mean"] == pytest.approx(10 * np.log10(1 / mse_test), abs=1e-4)
    assert m["test_recon"] == pytest.approx(4 * D * mse_test, rel=1e-5)  # SSE on [-1, 1]: 4x the [0, 1] error
    assert m["recon_mean"] == pytest.approx(4 * D * mse_test, rel=1e-5)
    assert m["gen_gap"] > 0, "test images are reconstructed worse than train images: the gap is positive"
    assert m["gen_gap"] == pytest.approx(4 * D * (mse_test - mse_train), rel=1e-5)


def test_kl_per_image_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl_per_image(mu, logvar), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(kl_per_dim(mu, logvar).sum(1).float(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- latent space

def test_kl_spectrum_sums_to_the_kl_per_image_and_active_units_count_planted_latents():
    g = torch.Generator().manual_seed(0)
    n, latents = 200, 32
    mu, logvar = torch.zeros(n, latents), torch.zeros(n, latents)  # a collapsed latent: q = N(0, 1), KL 0
    mu[:, :5] = 2 * torch.randn(n, 5, generator=g)  # five planted active latents
    logvar[:, :5] = -2.0
    mu[:, 5] = 0.1  # KL 0.005 nats: below the 0.01 threshold
    mu[:, 6] = 0.2  # KL 0.02 nats: above it
    spectrum = kl_spectrum(kl_per_dim(mu, logvar).mean(0))
    assert spectrum == sorted(spectrum, reverse=True) and len(spectrum) == latents
    assert sum(spectrum) == pytest.approx(kl_per_image(mu, logvar).mean().item(), rel=1e-6)
    assert spectrum[5] == pytest.approx(0.02) and spectrum[6] == pytest.approx(0.005)
    assert active_units_kl(spectrum) == 6


def test_final_kl_spectrum_sums_to_the_test_kl():
    torch.manual_seed(0)
    model = VAE(VAEConfig(width=8, latent_dim=16))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    m = small_final_metrics(model, x, y, x, y)
    assert len(m["kl_spectrum"]) == 16
    assert sum(m["kl_spectrum"]) == pytest.approx(m["test_kl"], rel=1e-5)
    assert m["active_units_kl"] == sum(v > 0.01 for v in m["kl_spectrum"])


@pytest.mark.parametrize("probe", [linear_probe, knn_probe])
def test_probes_score_1_on_separable_classes_and_chance_on_random_labels(probe):
    rng = np.random.default_rng(0)
    centres = 10 * rng.normal(size=(4, 8))
    y_train, y_test = rng.integers(0, 4, 2000), rng.integers(0, 4, 1000)
    train, test = centres[y_train] + rng.normal(size=(2000, 8)), centres[y_test] + rng.normal(size=(1000, 8))
    assert probe(train, y_train, test, y_test) == 1.0
    assert abs(probe(train, rng.integers(0, 4, 2000), test, rng.integers(0, 4, 1000)) - 0.25) < 0.06


# ----------------------------------------------------------------------------- likelihood

class LinearGaussian(nn.Module):
    """x = W z + b + e, z ~ N(0, I_L), e ~ N(0, 1/2 I_D): the suite's decoder likelihood on a linear decoder,
    so p(x) = N(b, W W^T + 1/2 I) in closed form. The exact posterior has precision P = I + 2 W^T W and mean
    P^-1 2 W^T (x - b); `encode` gives that mean and the diagonal of P^-1 (times `var_scale`)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, noise_scale: float = 1.0, var_scale: float = 1.0) -> None:
        super().__init__()
        self.w, self.b, self.noise_scale = w, b, noise_scale
        cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=torch.float64) + 2 * w.T.double() @ w.double())
        self.gain = (cov @ (2 * w.T.double())).float()
        self.logvar = torch.log(torch.diagonal(cov) * var_scale).float()

    def encode(self, x):
        mu = (x - self.b) @ self.gain.T
        return mu, self.logvar.expand_as(mu)

    def decode(self, z):
        return z @ self.w.T + self.b

    def log_px(self, x):
        cov = self.w.double() @ self.w.T.double() + 0.5 * torch.eye(self.w.shape[0], dtype=torch.float64)
        return MultivariateNormal(self.b.double(), cov).log_prob(x.double())

    def draw(self, n, generator):
        z = torch.randn(n, self.w.shape[1], generator=generator)
        return self.decode(z) + math.sqrt(0.5) * torch.randn(n, self.w.shape[0], generator=generator)


def linear_gaussian(orthogonal: bool, **kw) -> LinearGaussian:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g)
    if orthogonal:  # orthogonal columns: a diagonal exact posterior, which the encoder then matches
        w = torch.linalg.qr(w).Q * torch.tensor([2.0, 1.0, 0.5])
    return LinearGaussian(w, torch.randn(6, generator=g), **kw)


def test_iw_bound_equals_log_p_when_the_proposal_is_the_exact_posterior():
    """Every importance weight is p(x) itself, so the bound is exact at any k: this checks every constant
    of the decoder likelihood, the prior and the proposal."""
    model = linear_gaussian(orthogonal=True)
    x = model.draw(500, torch.Generator().manual_seed(1))
    for k in (1, 8):
        bound = iw_log_likelihood(model, x, k, torch.Generator().manual_seed(2))
        assert torch.allclose(bound, model.log_px(x), atol=1e-4), k


def test_iw_bound_tightens_with_k_and_stays_below_log_p():
    """A mismatched proposal (diagonal, too narrow: noise_scale 0.5): -L_k falls as k grows and stays at or
    above the exact -log p(x)."""
    model = linear_gaussian(orthogonal=False, noise_scale=0.5)
    x = model.draw(2000, torch.Generator().manual_seed(1))
    exact_nll = -model.log_px(x)
    gaps = []
    for k in (1, 4, 16, 64):
        nll = -iw_log_likelihood(model, x, k, torch.Generator().manual_seed(k))
        diff = (nll - exact_nll).double()
        gaps.append(diff.mean().item())
        assert diff.mean() > -3 * diff.std() / math.sqrt(len(diff)), f"k={k}: the bound is below -log p(x)"
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 0.1, "the mismatched proposal leaves a visible gap at k=1"


def test_iw_bound_at_k_1_and_noise_scale_1_is_the_elbo():
    """E[L_1] = E_q[log p(x|z)] - KL(q || p(z)), here in closed form:
    E_q ||x - W z - b||^2 = ||x - W mu - b||^2 + sum_j sigma_j^2 ||W_j||^2."""
    model = linear_gaussian(orthogonal=False, noise_scale=1.0)
    x = model.draw(20000, torch.Generator().manual_seed(1))
    mu, logvar = model.encode(x)
    var = logvar.exp().double()
    expected_sse = (x - model.decode(mu)).double().pow(2).sum(1) + (var * model.w.double().pow(2).sum(0)).sum(1)
    kl = kl_divergence(Normal(mu.double(), var.sqrt()), Normal(0.0, 1.0)).sum(1)
    elbo = -(expected_sse + 0.5 * 6 * math.log(math.pi)) - kl
    diff = iw_log_likelihood(model, x, 1, torch.Generator().manual_seed(3)) - elbo
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(len(diff))
    assert (elbo < model.log_px(x)).all(), "the ELBO is a bound"


def test_iw_bound_leaves_the_global_rng_alone_and_refuses_a_zero_noise_scale():
    model = linear_gaussian(orthogonal=False)
    x = model.draw(10, torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    a = iw_log_likelihood(model, x, 4, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, iw_log_likelihood(model, x, 4, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="noise_scale"):
        iw_log_likelihood(linear_gaussian(orthogonal=False, noise_scale=0.0), x, 4)


# ----------------------------------------------------------------------------- samples and wiring

def test_prior_samples_are_uint8_fixed_by_the_seed():
    torch.manual_seed(0)
    model = inference_copy(VAE(VAEConfig(width=8, latent_dim=16)))
    a = prior_samples(model, 70, seed=3, batch_size=32)
    assert a.dtype == torch.uint8 and a.shape == (70, 3, 32, 32)
    assert torch.equal(a, prior_samples(model, 70, seed=3, batch_size=32))
    assert not torch.equal(a, prior_samples(model, 70, seed=4, batch_size=32))
    with torch.no_grad():
        z = torch.randn(70, 16, generator=torch.Generator().manual_seed(3))
        expected = ((model.decode(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(a, expected)


def test_final_metrics_keep_the_old_keys_add_the_new_and_leave_the_training_rng_alone(monkeypatch):
    import ablation.evaluate as E

    pairs = []
    sharpness = E.sample_sharpness
    monkeypatch.setattr(E, "sample_sharpness", lambda s, r, b: pairs.append((s.shape, r.shape)) or sharpness(s, r, b))
    torch.manual_seed(0)
    model = VAE(VAEConfig(width=8, latent_dim=16, noise_scale=0.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    deterministic = small_final_metrics(model, x, y, x, y)  # z = mu has no density: no likelihood bound
    assert math.isnan(deterministic["iw_nll"]) and math.isnan(deterministic["iw_bpd"])
    assert deterministic["recon_mean"] == pytest.approx(deterministic["test_recon"], rel=1e-6)
    model.noise_scale = 0.3
    m = small_final_metrics(model, x, y, x, y)
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    old = {"test_recon", "test_kl", "test_loss", "trainsub_recon", "trainsub_kl", "trainsub_loss", "gen_gap", "mse01",
           "psnr", "neg_elbo", "bits_per_dim", "active_units", "probe_acc"}
    new = {"recon_mean", "psnr_mean", "ssim", "sharp_hf_ratio", "sharp_lap_ratio", "sample_hf_ratio",
           "sample_lap_ratio", "kl_spectrum", "active_units_kl", "knn_probe_acc", "iw_nll", "iw_bpd"}
    assert set(m) == old | new
    assert m["iw_bpd"] == pytest.approx(bits_per_dim(m["iw_nll"], D))
    assert 0 < m["ssim"] < 1 and m["sharp_hf_ratio"] > 0 and m["sample_lap_ratio"] > 0
    assert small_final_metrics(model, x, y, x, y) == m, "deterministic"
    assert pairs[-1] == ((60, 3, 32, 32), (60, 3, 32, 32)), "64 samples asked, 60 test images: 60 of each"
    small_final_metrics(model, x, y, x, y, sample_images=20)
    assert pairs[-1] == ((20, 3, 32, 32), (20, 3, 32, 32))
