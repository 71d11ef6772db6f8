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
"""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from .data import eval_batches
from .objective import bits_per_dim, gaussian_nll_from_sse, kl_per_image, recon_per_image

ACTIVE_UNIT_THRESHOLD = 0.01
EVAL_NOISE_SEED = 1234


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


def final_metrics(model, test_x: torch.Tensor, test_y: torch.Tensor, trainsub_x: torch.Tensor,
                  trainsub_y: torch.Tensor, beta: float, batch_size: int, autocast=None,
                  test: dict | None = None, train: dict | None = None) -> dict:
    """The end-of-run metrics listed in the module docstring.

    `test` and `train` may be `evaluate(..., keep_mu=True)` results of this very model on
    these images (the last epoch's), which are then used instead of evaluating again.
    """
    if test is None or "mu" not in test or train is None or "mu" not in train:
        model = inference_copy(model)
    if test is None or "mu" not in test:
        test = evaluate(model, test_x, beta, batch_size, autocast, keep_mu=True, folded=True)
    if train is None or "mu" not in train:
        train = evaluate(model, trainsub_x, beta, batch_size, autocast, keep_mu=True, folded=True)
    dims = int(np.prod(test_x.shape[1:]))
    mse01 = test["recon"] / (4.0 * dims)
    neg_elbo = float(gaussian_nll_from_sse(test["recon"], dims) + test["kl"])
    variances = test["mu"].var(axis=0)
    return {
        "test_recon": test["recon"],
        "test_kl": test["kl"],
        "test_loss": test["loss"],
        "trainsub_recon": train["recon"],
        "trainsub_kl": train["kl"],
        "trainsub_loss": train["loss"],
        "gen_gap": test["recon"] - train["recon"],
        "mse01": mse01,
        "psnr": 10.0 * math.log10(1.0 / mse01) if mse01 > 0 else float("inf"),
        "neg_elbo": neg_elbo,
        "bits_per_dim": bits_per_dim(neg_elbo, dims),
        "active_units": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
        "probe_acc": linear_probe(train["mu"], trainsub_y.cpu().numpy(), test["mu"], test_y.cpu().numpy()),
    }
