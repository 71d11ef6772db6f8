"""The seed's convolutional VAE, with switchable dropout and batch norm and a width multiplier.

With width=128 and latent_dim=128 it is the seed architecture layer by layer:

    encoder  Conv2d 3->128->256->512 (k4 s2 p1), then fc_mu, fc_logvar from 512*(H/8)*(W/8)
    decoder  Linear latent->512*(H/8)*(W/8), ConvTranspose2d 512->256->128->64 (k4 s2 p1),
             Conv2d 64->3 (k3 s1 p1), Tanh

Every hidden block is conv -> [BatchNorm2d] -> ReLU -> [Dropout]; the output layer has
neither. Dropout is `Dropout`, an nn.Dropout with a cheaper mask sampler. Channel counts scale
with `width` (w, 2w, 4w and 4w, 2w, w, w/2). The model is built from a `VAEConfig`
(`model_config` derives it from a run config) and returns a `VAEOutput(recon, mu, logvar)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .regularizers import effective


class Dropout(nn.Dropout):
    """nn.Dropout with, on the CPU, masks from 16 random bits per activation, drawn into reused buffers.

    In train mode each activation is kept with probability 1-p and scaled by 1/(1-p), zeroed
    otherwise, independently; eval mode is the identity, as in nn.Dropout, and on CUDA this is
    nn.Dropout. On the CPU, nn.Dropout draws one Bernoulli float per activation into fresh
    tensors. Here one 64-bit draw (`random_` over the full int64 range, from the global
    generator, so seeding and checkpointed RNG states work as before) gives four activations a
    16-bit uniform each, and the draws, the mask and its float copy live in buffers kept between
    steps. p is used as round(p * 2^16) / 2^16, within 7.7e-6 of p (0.3 -> 0.300003). Under bf16
    autocast the mask is bf16, so 1/(1-p) is rounded as nn.Dropout rounds it (1/0.7 -> 1.4297).
    `make bench` measures it against the seed's nn.Dropout layers (docs/benchmark.md).

    The float mask is what autograd saves for the backward pass, and the next forward pass
    overwrites it in place. Calling backward on an older forward pass after a newer one is
    therefore refused by autograd ("modified by an inplace operation") instead of being wrong.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        # flat buffers for the largest activation seen; a smaller one (the last, partial batch of
        # an epoch) uses their first elements, so the buffers are allocated once per run
        self._words = self._keep = self._mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        if x.device.type != "cpu":  # CUDA's fused Philox dropout is already cheap
            return nn.functional.dropout(x, self.p, True)
        return x * self.mask_like(x)

    def mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh draw of the scaled mask (0 or 1/(1-p)), shaped and laid out like `x`."""
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n, words_n = x.numel(), (x.numel() + 3) // 4
        mask = self._mask
        if mask is None or mask.numel() < n or mask.dtype != x.dtype or mask.device != x.device:
            self._words = torch.empty(words_n, dtype=torch.int64, device=x.device)
            self._keep = torch.empty(n, dtype=torch.bool, device=x.device)
            self._mask = torch.empty(n, dtype=x.dtype, device=x.device)

        def like_x(flat: torch.Tensor) -> torch.Tensor:  # x's shape and memory layout over a dense prefix
            return flat[:n].as_strided(x.size(), x.stride())

        words = self._words[:words_n]
        words.random_(-2 ** 63, None)
        # iid 16-bit uniforms over [-2^15, 2^15), four per 64-bit draw
        keep = torch.ge(like_x(words.view(torch.int16)), round(self.p * 65536) - 32768, out=like_x(self._keep))
        return like_x(self._mask).copy_(keep).mul_(1.0 / (1.0 - self.p))

    def __getstate__(self) -> dict:  # deepcopy and pickling leave the buffers behind; they are redrawn anyway
        return self.__dict__ | {"_words": None, "_keep": None, "_mask": None}


def _block(conv: nn.Module, channels: int, batchnorm: bool, dropout: float,
           dropout_layer: type[nn.Dropout]) -> nn.Sequential:
    layers = [conv]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(dropout_layer(dropout))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class VAEConfig:
    """Everything the model's shape and layers depend on."""

    image_size: int = 32  # side of the square input; a multiple of 8 (three stride-2 stages)
    channels: int = 3
    width: int = 128  # base channels: encoder w,2w,4w; decoder 4w,2w,w,w/2 (the seed: 128)
    latent_dim: int = 128  # size of z (the seed: 128)
    noise_scale: float = 0.3  # z = mu + noise_scale*eps*std; the seed uses 0.3, 1.0 is the textbook VAE
    dropout: float = 0.0  # dropout probability after each hidden block; 0 = no dropout layers
    batchnorm: bool = False  # BatchNorm2d after each hidden conv/deconv
    stock_dropout: bool = False  # nn.Dropout instead of the suite's `Dropout` (the seed's own layers)


class VAEOutput(NamedTuple):
    recon: torch.Tensor  # decoded images on the [-1, 1] scale
    mu: torch.Tensor  # posterior means
    logvar: torch.Tensor  # posterior log-variances


class VAE(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        c = config
        if c.image_size % 8:
            raise ValueError(f"image_size={c.image_size} must be a multiple of 8 (three stride-2 stages)")
        self.config = c
        self.latent_dim = c.latent_dim
        self.noise_scale = c.noise_scale
        self.feature = c.image_size // 8
        dropout_layer = nn.Dropout if c.stock_dropout else Dropout
        enc = [c.width, 2 * c.width, 4 * c.width]
        dec = [4 * c.width, 2 * c.width, c.width, max(1, c.width // 2)]
        self.top = enc[-1]
        ins = [c.channels] + enc[:-1]
        self.encoder = nn.Sequential(
            *[_block(nn.Conv2d(i, o, 4, 2, 1), o, c.batchnorm, c.dropout, dropout_layer) for i, o in zip(ins, enc)],
            nn.Flatten(),
        )
        flat = self.top * self.feature * self.feature
        self.fc_mu = nn.Linear(flat, c.latent_dim)
        self.fc_logvar = nn.Linear(flat, c.latent_dim)
        self.fc_decode = nn.Linear(c.latent_dim, flat)
        self.decoder = nn.Sequential(
            *[_block(nn.ConvTranspose2d(i, o, 4, 2, 1), o, c.batchnorm, c.dropout, dropout_layer)
              for i, o in zip(dec[:-1], dec[1:])],
            nn.Conv2d(dec[-1], c.channels, 3, 1, 1),
            nn.Tanh(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + noise_scale * eps * std; eps from `generator` when given (evaluation), else the global RNG."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + self.noise_scale * eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_decode(z).view(-1, self.top, self.feature, self.feature)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        return VAEOutput(self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.fc_decode.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode(z)


def model_config(cfg, image_size: int, channels: int = 3, stock_dropout: bool = False) -> VAEConfig:
    """The model's settings from a resolved run config and the data's image size: the model block
    plus the effective dropout and batch-norm regularizers."""
    reg = effective(cfg)
    return VAEConfig(image_size=image_size, channels=channels, width=cfg.model.width,
                     latent_dim=cfg.model.latent_dim, noise_scale=cfg.model.noise_scale, dropout=reg.dropout.p,
                     batchnorm=reg.batchnorm.enabled, stock_dropout=stock_dropout)


def build_model(cfg, image_size: int, channels: int = 3, stock_dropout: bool = False) -> VAE:
    """The VAE for a resolved run config and the data's image size."""
    return VAE(model_config(cfg, image_size, channels, stock_dropout))
