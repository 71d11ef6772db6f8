"""The VAE objective, per image: summed squared error plus beta times the KL.

Each term is summed over an image's pixels (or latents) and averaged over the batch,
so every value is "per image" and beta has one meaning in training and evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor  # recon + beta * kl, per image
    recon: torch.Tensor  # squared error summed over pixels ([-1, 1] scale), per image
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)) in nats, per image


def kl_per_image(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of a diagonal Gaussian posterior from the standard normal prior, one value per image."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def recon_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels and pixels, one value per image."""
    return (x_hat.float() - x.float()).pow(2).flatten(1).sum(dim=1)


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> LossParts:
    """Batch mean of the per-image loss, returned as named parts."""
    recon = recon_per_image(x_hat, x).mean()
    kl = kl_per_image(mu.float(), logvar.float()).mean()
    return LossParts(total=recon + beta * kl, recon=recon, kl=kl)


def gaussian_nll_from_sse(sse: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """-log N(x; x_hat, sigma^2 I) with sigma^2 = 1/2, the density for which the SSE is the NLL.

    With sigma^2 = 1/2, -log p = SSE + (D/2) log(pi): the training objective's recon term plus
    a constant, on the [-1, 1] pixel scale.
    """
    return sse + 0.5 * dims * math.log(math.pi)


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Nats per image on the [-1, 1] scale to bits per dimension on the 0..255 scale.

    The continuous-decoder convention: the density is moved from [-1, 1] to [0, 256) by the
    change of variables x = v / 127.5 - 1, which adds D log(127.5) nats; no dequantization.
    """
    return (nll_nats + dims * math.log(127.5)) / (dims * math.log(2))
