"""Evaluation metrics, computed in eval mode under `torch.inference_mode()` without augmentation.

Per-epoch (`evaluate`), on the test set and on a fixed train subset of the same size:
    recon   squared error summed over pixels on the [-1, 1] scale, per image (the objective's term)
    kl      KL(q(z|x) || N(0, I)) in nats per image
    loss    recon + beta * kl with the run's own beta (not comparable across betas)

Final (`final_metrics`), once at the end of a run:
    mse01          per-pixel MSE on the [0, 1] scale = recon / (4 * D), D = C*H*W
    psnr           10 log10(1 / mse01) in dB, from the test-set mean MSE
    neg_elbo       beta-independent test negative ELBO with beta = 1, in nats per image, for a
                   Gaussian decoder with sigma^2 = 1/2 (so -log p(x|z) = SSE + D/2 log pi), with
                   z drawn as in training (noise_scale; a true ELBO only at noise_scale=1)
    bits_per_dim   neg_elbo moved to the 0..255 scale (+ D log 127.5) over D log 2
    active_units   latents whose posterior-mean variance over the test set exceeds 0.01
    probe_acc      accuracy on test mu of a logistic regression fit on train-subset mu
and the measures of `ablation/measures.py` (formulas and directions there):
    recon_mean, psnr_mean, ssim          test reconstructions from the posterior mean, decode(mu)
    sharp_hf_ratio, sharp_lap_ratio      their fine detail relative to the originals
    kl_spectrum, active_units_kl         the test KL of each latent, sorted; latents above 0.01 nats
    knn_probe_acc                        k-NN accuracy on test mu, fit on train-subset mu
    iw_nll, iw_bpd                       importance-weighted bound on -log p(x) (eval.iw_samples,
                                         eval.iw_images), a valid likelihood bound at any noise_scale
    sample_hf_ratio, sample_lap_ratio    fine detail of eval.sample_images prior samples (`prior_samples`;
                                         at most as many as test images) relative to as many real ones
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from .config import EvalConfig
from . import sample_quality
from .classifier import SuiteClassifier
from .data import eval_batches, stratified_indices
from .measures import (active_units_kl, hf_energy, iw_log_likelihood, kl_per_dim, kl_spectrum, knn_probe,
                       laplacian_variance, mse01, psnr, ratio, ssim_per_image, to_01)
from .objective import bits_per_dim, gaussian_nll_from_sse, kl_per_image, recon_per_image

ACTIVE_UNIT_THRESHOLD = 0.01
EVAL_NOISE_SEED = 1234
MEASURE_SUBSET_SEED = 0  # fixes the test images of the likelihood bound and of the sample comparison, for every run


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm2d folded into the conv before it.

    In eval mode a batch norm is a fixed per-channel affine map, so it can be merged into the
    weights and bias of the preceding Conv2d or ConvTranspose2d: the same function up to float
    rounding (about 1e-6 relative), one pass over the activations fewer per block. The model
    itself is left as it was.
    """
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if not isinstance(block, nn.Sequential):
            continue
        for i in range(len(block) - 1):
            conv, bn = block[i], block[i + 1]
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                merged = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                if conv.weight.is_contiguous(memory_format=torch.channels_last):  # keep the model's layout
                    merged = merged.to(memory_format=torch.channels_last)
                block[i] = merged
                block[i + 1] = nn.Identity()
    return folded


@torch.inference_mode()
def evaluate(model, images: torch.Tensor, beta: float, batch_size: int, autocast=None,
             keep_mu: bool = False, folded: bool = False) -> dict:
    """Mean per-image recon, KL and loss of `images` (uint8) in eval mode; optionally the mus.

    Runs on `inference_copy(model)`, so the model's own mode and weights are untouched; with
    folded=True, `model` is already such a copy (one copy serves several image sets). The
    reparameterisation noise comes from a generator with a fixed seed, so the same model and
    images always give the same numbers, and evaluation leaves the training RNG untouched.
    """
    if not folded:
        model = inference_copy(model)
    elif model.training:
        raise ValueError("evaluate(folded=True) needs an inference_copy(model), which is in eval mode")
    generator = torch.Generator(device=images.device).manual_seed(EVAL_NOISE_SEED)
    sums = torch.zeros(2, dtype=torch.float64, device=images.device)
    mus = []
    for x in eval_batches(images, batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            out = model(x, generator)
        sums[0] += recon_per_image(out.recon, x).sum()
        sums[1] += kl_per_image(out.mu.float(), out.logvar.float()).sum()
        if keep_mu:
            mus.append(out.mu.float())
    recon, kl = (sums / images.shape[0]).tolist()
    out = {"recon": recon, "kl": kl, "loss": recon + beta * kl}
    if keep_mu:
        out["mu"] = torch.cat(mus).cpu().numpy()
    return out


def linear_probe(train_mu: np.ndarray, train_y: np.ndarray, test_mu: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a standardized logistic regression on the posterior means."""
    if len(np.unique(train_y)) < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_mu, train_y)
    return float(probe.score(test_mu, test_y))


def _check_folded(model) -> None:
    if model.training:
        raise ValueError("this pass needs an inference_copy(model), which is in eval mode")


@torch.inference_mode()
def posterior_mean_measures(model, images: torch.Tensor, batch_size: int, autocast=None) -> dict:
    """Measures of the deterministic reconstructions decode(mu) of `images` (uint8), and the KL spectrum.

    `model` is an `inference_copy`. recon_mean is the objective's SSE per image ([-1, 1] scale),
    psnr_mean its PSNR on the [0, 1] scale, ssim the mean SSIM; the sharpness ratios are mean
    `hf_energy` and `laplacian_variance` of the reconstructions over those of the originals.
    """
    _check_folded(model)
    n, dims = images.shape[0], int(np.prod(images.shape[1:]))
    sums = torch.zeros(6, dtype=torch.float64, device=images.device)  # sse, ssim, hf recon/orig, lap recon/orig
    kl_dims = 0.0
    for x in eval_batches(images, batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            mu, logvar = model.encode(x)
            x_hat = model.decode(mu)
        x_hat = x_hat.float()
        x_hat01, x01 = to_01(x_hat), to_01(x)
        sums += torch.stack([recon_per_image(x_hat, x).sum(), ssim_per_image(x_hat01, x01).sum(),
                             hf_energy(x_hat01).sum(), hf_energy(x01).sum(),
                             laplacian_variance(x_hat01).sum(), laplacian_variance(x01).sum()]).double()
        kl_dims = kl_dims + kl_per_dim(mu.float(), logvar.float()).sum(0)
    sse, ssim_sum, hf_recon, hf_orig, lap_recon, lap_orig = sums.tolist()
    spectrum = kl_spectrum(kl_dims / n)
    return {
        "recon_mean": sse / n,
        "psnr_mean": psnr(mse01(sse / n, dims)),
        "ssim": ssim_sum / n,
        "sharp_hf_ratio": ratio(hf_recon, hf_orig),
        "sharp_lap_ratio": ratio(lap_recon, lap_orig),
        "kl_spectrum": spectrum,
        "active_units_kl": active_units_kl(spectrum),
    }


@torch.inference_mode()
def iw_bound(model, images: torch.Tensor, k: int, batch_size: int, autocast=None) -> dict:
    """iw_nll: the mean over `images` (uint8) of -`iw_log_likelihood` with k importance samples, in nats
    per image (an upper bound on -log p(x); lower = better); iw_bpd: the same in bits/dim on the 0..255
    scale. `model` is an `inference_copy`; the draws come from a generator with a fixed seed. With
    noise_scale = 0 (z = mu, a proposal without a density) there is no bound: both are NaN."""
    _check_folded(model)
    dims = int(np.prod(images.shape[1:]))
    if model.noise_scale == 0:
        return {"iw_nll": float("nan"), "iw_bpd": float("nan")}
    generator = torch.Generator(device=images.device).manual_seed(EVAL_NOISE_SEED)
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for x in eval_batches(images, batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            total -= iw_log_likelihood(model, x, k, generator).sum()
    nll = total.item() / images.shape[0]
    return {"iw_nll": nll, "iw_bpd": bits_per_dim(nll, dims)}


@torch.inference_mode()
def prior_samples(model, n: int, seed: int, batch_size: int, autocast=None) -> torch.Tensor:
    """n images decoded from z ~ N(0, I), as uint8 [n, C, H, W] like the data's images (the decoder's
    [-1, 1] output rounded to 0..255). z comes from a generator seeded by `seed` (the run's seed), so
    the samples are fixed by the model and the seed. `model` is an `inference_copy`.

    The sample measures of `final_metrics` (sharpness and sample quality) all use these samples.
    """
    _check_folded(model)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=generator, device=device)
    out = []
    for zb in z.split(batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            x = model.decode(zb)
        out.append(((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _detail(images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean `hf_energy` and mean `laplacian_variance` over `images` (uint8)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for start in range(0, images.shape[0], batch_size):
        x01 = to_01(images[start:start + batch_size])
        sums += torch.stack([hf_energy(x01).sum(), laplacian_variance(x01).sum()]).double().cpu()
    return tuple((sums / max(images.shape[0], 1)).tolist())


def sample_sharpness(samples: torch.Tensor, real: torch.Tensor, batch_size: int) -> dict:
    """Mean `hf_energy` and `laplacian_variance` of prior samples over those of real images (both uint8)."""
    (hf_s, lap_s), (hf_r, lap_r) = _detail(samples, batch_size), _detail(real, batch_size)
    return {"sample_hf_ratio": ratio(hf_s, hf_r), "sample_lap_ratio": ratio(lap_s, lap_r)}


def final_metrics(model, test_x: torch.Tensor, test_y: torch.Tensor, trainsub_x: torch.Tensor,
                  trainsub_y: torch.Tensor, beta: float, batch_size: int, autocast=None,
                  test: dict | None = None, train: dict | None = None, iw_samples: int = EvalConfig.iw_samples,
                  iw_images: int | None = EvalConfig.iw_images, sample_images: int = EvalConfig.sample_images,
                  seed: int = 0, classifier: SuiteClassifier | None = None,
                  inception_weights: str | None = None) -> dict:
    """The end-of-run metrics listed in the module docstring.

    `test` and `train` may be `evaluate(..., keep_mu=True)` results of this very model on
    these images (the last epoch's), which are then used instead of evaluating again.
    iw_samples, iw_images and sample_images are the run's eval.* settings, `seed` its seed (it
    fixes the prior samples). With a suite `classifier`, the sample-quality measures (FD, KID,
    precision/recall in its features; FID/KID too with local `inception_weights`) are added. Every draw comes from a generator of its own: the training RNG
    is left as it was.
    """
    folded = inference_copy(model)
    if test is None or "mu" not in test:
        test = evaluate(folded, test_x, beta, batch_size, autocast, keep_mu=True, folded=True)
    if train is None or "mu" not in train:
        train = evaluate(folded, trainsub_x, beta, batch_size, autocast, keep_mu=True, folded=True)
    dims = int(np.prod(test_x.shape[1:]))
    mse = mse01(test["recon"], dims)
    neg_elbo = float(gaussian_nll_from_sse(test["recon"], dims) + test["kl"])
    variances = test["mu"].var(axis=0)
    train_y, test_y_np = trainsub_y.cpu().numpy(), test_y.cpu().numpy()
    metrics = {
        "test_recon": test["recon"],
        "test_kl": test["kl"],
        "test_loss": test["loss"],
        "trainsub_recon": train["recon"],
        "trainsub_kl": train["kl"],
        "trainsub_loss": train["loss"],
        "gen_gap": test["recon"] - train["recon"],
        "mse01": mse,
        "psnr": psnr(mse),
        "neg_elbo": neg_elbo,
        "bits_per_dim": bits_per_dim(neg_elbo, dims),
        "active_units": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
        "probe_acc": linear_probe(train["mu"], train_y, test["mu"], test_y_np),
    }
    metrics |= posterior_mean_measures(folded, test_x, batch_size, autocast)
    metrics["knn_probe_acc"] = knn_probe(train["mu"], train_y, test["mu"], test_y_np)
    iw_idx = stratified_indices(test_y, iw_images, MEASURE_SUBSET_SEED).to(test_x.device)
    metrics |= iw_bound(folded, test_x[iw_idx], iw_samples, batch_size, autocast)

    # generated images: one set of prior samples and as many real test images (class-stratified); with
    # fewer test images than eval.sample_images, all of them and as many samples, so the two sets match
    n_samples = min(sample_images, test_x.shape[0])
    samples = prior_samples(folded, n_samples, seed, batch_size, autocast)
    real = test_x[stratified_indices(test_y, n_samples, MEASURE_SUBSET_SEED).to(test_x.device)]
    metrics |= sample_sharpness(samples, real, batch_size)
    if classifier is not None:  # sample quality of the same samples against the same real images
        metrics |= sample_quality.measure(classifier, samples, real, inception_weights, test_x.device)
    return metrics
