"""The seed's convolutional VAE, with switchable dropout and batch norm and a width multiplier.

With width=128 and latent_dim=128 it is the seed architecture layer by layer:

    encoder  Conv2d 3->128->256->512 (k4 s2 p1), then fc_mu, fc_logvar from 512*(H/8)*(W/8)
    decoder  Linear latent->512*(H/8)*(W/8), ConvTranspose2d 512->256->128->64 (k4 s2 p1),
             Conv2d 64->3 (k3 s1 p1), Tanh

Every hidden block is conv -> [BatchNorm2d] -> ReLU -> [Dropout]; the output layer has
neither. Dropout is `Dropout`, an nn.Dropout with a faster sampler (same distribution). Channel counts scale with `width` (w, 2w, 4w and 4w, 2w, w, w/2).
"""
from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """nn.Dropout with the same distribution, drawn faster on the CPU.

    Each activation is kept with probability 1-p and scaled by 1/(1-p), zeroed otherwise, in
    train mode only. The mask comes from `torch.rand_like(x) >= p`, which on the CPU is about 4x
    faster than the Bernoulli sampler behind nn.functional.dropout (measured on this suite's
    activations: dropout was a third of the width-32 training step).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


def _block(conv: nn.Module, channels: int, batchnorm: bool, dropout: float) -> nn.Sequential:
    layers = [conv]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(Dropout(dropout))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        width: int = 128,
        latent_dim: int = 128,
        noise_scale: float = 0.3,
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size={image_size} must be a multiple of 8 (three stride-2 stages)")
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.noise_scale = noise_scale
        self.feature = image_size // 8
        enc = [width, 2 * width, 4 * width]
        dec = [4 * width, 2 * width, width, max(1, width // 2)]
        self.top = enc[-1]
        ins = [channels] + enc[:-1]
        self.encoder = nn.Sequential(
            *[_block(nn.Conv2d(i, o, 4, 2, 1), o, batchnorm, dropout) for i, o in zip(ins, enc)],
            nn.Flatten(),
        )
        flat = self.top * self.feature * self.feature
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            *[_block(nn.ConvTranspose2d(i, o, 4, 2, 1), o, batchnorm, dropout) for i, o in zip(dec[:-1], dec[1:])],
            nn.Conv2d(dec[-1], channels, 3, 1, 1),
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

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.fc_decode.weight.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.decode(z)


def build_model(cfg, image_size: int, channels: int = 3) -> VAE:
    """The VAE for a resolved config and the data's image size."""
    return VAE(
        image_size=image_size,
        channels=channels,
        width=cfg.model.width,
        latent_dim=cfg.model.latent_dim,
        noise_scale=cfg.model.noise_scale,
        dropout=cfg.dropout.p if cfg.dropout.enabled else 0.0,
        batchnorm=cfg.batchnorm.enabled,
    )
