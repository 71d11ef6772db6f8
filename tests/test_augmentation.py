"""The fast augmentation (ablation.data.augment on uint8 batches) matches torchvision's in distribution.

A 32x32 "coordinate image" stores row+1 in channel 0, column+1 in channel 1 and 255 in
channel 2, so zero padding is recognisable and each augmented output tells where its crop
started (oy, ox in 0..8 for padding 4) and whether it was flipped.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ablation.data import TrainBatches, augment, to_unit_range

SIZE, PAD = 32, 4
CELLS = 2 * PAD + 1
N_FAST = 20000  # draws of the suite's batch-wise augmentation
N_TV = 6000  # draws of torchvision's per-image transforms (slower)
ALPHA = 1e-3


def coordinate_image() -> torch.Tensor:
    rows = torch.arange(1, SIZE + 1, dtype=torch.uint8).view(SIZE, 1).expand(SIZE, SIZE)
    cols = torch.arange(1, SIZE + 1, dtype=torch.uint8).view(1, SIZE).expand(SIZE, SIZE)
    return torch.stack([rows, cols, torch.full((SIZE, SIZE), 255, dtype=torch.uint8)])


def decode(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flipped, oy, ox) of each augmented coordinate image, in augment's convention (flip, then crop).

    The centre pixel is never padding: it holds row oy+12 and column ox+12 of the padded, possibly
    flipped image. A crop of a flipped image at ox is a flipped crop at 8-ox, so torchvision's
    crop-then-flip decodes to the same (flip, offset) distribution.
    """
    c = SIZE // 2
    row = out[:, 0, c, c].long() - 1
    col = out[:, 1, c, c].long() - 1
    flipped = (out[:, 1, c, c + 1].long() - out[:, 1, c, c].long()) < 0
    oy = row - (c - PAD)
    ox = torch.where(flipped, (SIZE - 1 - col) - (c - PAD), col - (c - PAD))
    return flipped.numpy(), oy.numpy(), ox.numpy()


def histogram(oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    assert oy.min() >= 0 and oy.max() < CELLS and ox.min() >= 0 and ox.max() < CELLS
    return np.bincount(oy * CELLS + ox, minlength=CELLS * CELLS)


def reference(image: torch.Tensor, flipped: bool, oy: int, ox: int) -> torch.Tensor:
    x = image.flip(2) if flipped else image
    return F.pad(x, (PAD, PAD, PAD, PAD))[:, oy:oy + SIZE, ox:ox + SIZE]


@pytest.fixture(scope="module")
def fast() -> tuple[torch.Tensor, torch.Tensor]:
    image = coordinate_image()
    gen = torch.Generator().manual_seed(1234)
    return image, augment(image.expand(N_FAST, -1, -1, -1).contiguous(), True, PAD, gen)


@pytest.fixture(scope="module")
def torchvision_draws() -> torch.Tensor:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(SIZE, padding=PAD), v2.RandomHorizontalFlip()])
    image = coordinate_image()
    torch.manual_seed(1234)
    return torch.stack([transform(image) for _ in range(N_TV)])


def test_output_is_an_exact_flipped_zero_padded_crop(fast):
    image, out = fast
    assert out.dtype == torch.uint8 and out.shape == (N_FAST, 3, SIZE, SIZE)
    flipped, oy, ox = decode(out)
    for i in range(0, N_FAST, 37):  # ~540 images checked pixel for pixel
        assert torch.equal(out[i], reference(image, bool(flipped[i]), int(oy[i]), int(ox[i]))), i


def test_flip_rate_is_one_half(fast):
    flipped, _, _ = decode(fast[1])
    assert stats.binomtest(int(flipped.sum()), flipped.size, 0.5).pvalue > ALPHA


def test_crop_offsets_are_uniform_over_the_9x9_range(fast):
    _, oy, ox = decode(fast[1])
    counts = histogram(oy, ox)
    assert (counts > 0).all()  # every one of the 81 offsets occurs
    assert stats.chisquare(counts).pvalue > ALPHA
    for marginal in (oy, ox):
        assert stats.chisquare(np.bincount(marginal, minlength=CELLS)).pvalue > ALPHA
    flipped, _, _ = decode(fast[1])
    table = np.stack([histogram(oy[flipped], ox[flipped]), histogram(oy[~flipped], ox[~flipped])])
    assert stats.chi2_contingency(table).pvalue > ALPHA  # flip independent of the offsets


def test_same_distribution_as_torchvision(fast, torchvision_draws):
    tv_flipped, tv_oy, tv_ox = decode(torchvision_draws)
    tv_counts = histogram(tv_oy, tv_ox)
    assert stats.chisquare(tv_counts).pvalue > ALPHA  # torchvision's offsets are uniform too
    assert stats.binomtest(int(tv_flipped.sum()), tv_flipped.size, 0.5).pvalue > ALPHA
    image = coordinate_image()
    for i in range(0, N_TV, 97):  # and torchvision's outputs decode to exact crops as well
        assert torch.equal(torchvision_draws[i],
                           reference(image, bool(tv_flipped[i]), int(tv_oy[i]), int(tv_ox[i]))), i
    fast_flipped, oy, ox = decode(fast[1])
    table = np.stack([histogram(oy, ox), tv_counts])
    assert stats.chi2_contingency(table).pvalue > ALPHA  # two-sample test: no difference
    flips = np.array([[fast_flipped.sum(), (~fast_flipped).sum()], [tv_flipped.sum(), (~tv_flipped).sum()]])
    assert stats.chi2_contingency(flips).pvalue > ALPHA


def test_padding_is_zero_and_values_stay_in_range(fast):
    _, out = fast
    _, oy, ox = decode(out)
    padded = out[:, 2] == 0  # channel 2 is 255 everywhere in the source image
    assert (out.permute(1, 0, 2, 3)[:, padded] == 0).all()  # all channels are zero where it is padding
    # the padded border is exactly as wide as the offset says: |4 - offset| rows/columns
    expected = torch.from_numpy(np.abs(PAD - oy) * SIZE + np.abs(PAD - ox) * SIZE
                                - np.abs(PAD - oy) * np.abs(PAD - ox))
    assert torch.equal(padded.flatten(1).sum(1), expected)
    scaled = to_unit_range(out)
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0
    assert (scaled.permute(1, 0, 2, 3)[:, padded] == -1.0).all()  # padding is black, as in the seed's PIL pipeline


def test_float_input_stays_in_range_and_pads_with_zeros():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(512, 3, SIZE, SIZE, generator=gen) * 2 - 1
    out = augment(x, True, PAD, torch.Generator().manual_seed(1))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.min() >= -1.0 and out.max() <= 1.0
    mask = augment(torch.ones(512, 1, SIZE, SIZE), True, PAD, torch.Generator().manual_seed(1)) == 0
    assert (out[mask.expand_as(out)] == 0).all()


def test_same_generator_seed_gives_the_same_batches():
    images = coordinate_image().expand(300, -1, -1, -1).contiguous()
    a = [b for b in TrainBatches(images, 128, True, PAD, seed=7)]
    b = [b for b in TrainBatches(images, 128, True, PAD, seed=7)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [x.shape[0] for x in a] == [128, 128, 44]
    assert all(x.min() >= -1.0 and x.max() <= 1.0 for x in a)


def test_reflect_padding_gives_exact_flipped_reflect_padded_crops():
    """pad_mode=reflect: each output is a crop of the reflect-padded (possibly flipped) image, as
    torchvision's RandomCrop(padding_mode="reflect") cuts, and every offset occurs."""
    image = coordinate_image()
    out = augment(image.expand(4000, -1, -1, -1).contiguous(), True, PAD, torch.Generator().manual_seed(7),
                  pad_mode="reflect")
    assert (out[:, 2] == 255).all(), "no zero padding anywhere"
    seen = set()
    for i in range(0, 4000, 7):
        matches = [(f, oy, ox) for f in (False, True) for oy in range(CELLS) for ox in range(CELLS)
                   if torch.equal(out[i], F.pad((image.flip(2) if f else image).unsqueeze(0).float(),
                                                (PAD,) * 4, mode="reflect")[0, :, oy:oy + SIZE, ox:ox + SIZE]
                                  .to(torch.uint8))]
        assert matches, i
        seen.add(matches[0][1:])
    assert len(seen) == CELLS * CELLS
