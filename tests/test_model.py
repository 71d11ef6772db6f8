"""The seed architecture, and each regularizer switch acting where it should."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ablation.regularizers import flags
from ablation.classifier import load_or_train
from ablation.data import ImageData, TrainBatches, eval_batches, to_unit_range
from ablation.evaluate import evaluate
from ablation.model import VAE, VAEConfig, build_model
from ablation.objective import kl_per_image, vae_loss
from ablation.trainer import RunSettings, Trainer, make_optimizer
from ablation.wandb_logger import NullLogger

SEED_PARAMS = 8_537_347  # the seed VAE at width 128, latent 128, 32x32 RGB


def layers(module: nn.Module, kind) -> list:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_default_model_is_the_seed_architecture():
    m = VAE()
    convs = layers(m.encoder, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 128, (4, 4), (2, 2), (1, 1)), (128, 256, (4, 4), (2, 2), (1, 1)), (256, 512, (4, 4), (2, 2), (1, 1))]
    assert (m.fc_mu.in_features, m.fc_mu.out_features) == (512 * 4 * 4, 128)
    assert (m.fc_logvar.in_features, m.fc_logvar.out_features) == (512 * 4 * 4, 128)
    assert (m.fc_decode.in_features, m.fc_decode.out_features) == (128, 512 * 4 * 4)
    deconvs = layers(m.decoder, nn.ConvTranspose2d)
    assert [(d.in_channels, d.out_channels, d.kernel_size, d.stride, d.padding) for d in deconvs] == [
        (512, 256, (4, 4), (2, 2), (1, 1)), (256, 128, (4, 4), (2, 2), (1, 1)), (128, 64, (4, 4), (2, 2), (1, 1))]
    out = m.decoder[-2]
    assert isinstance(out, nn.Conv2d) and (out.in_channels, out.out_channels, out.kernel_size, out.padding) == (
        64, 3, (3, 3), (1, 1))
    assert isinstance(m.decoder[-1], nn.Tanh)
    assert sum(p.numel() for p in m.parameters()) == SEED_PARAMS
    assert m.noise_scale == 0.3
    assert not layers(m, nn.Dropout) and not layers(m, nn.BatchNorm2d)


def test_shapes_follow_width_and_image_size():
    m = VAE(VAEConfig(image_size=64, width=8, latent_dim=16))
    x = torch.randn(2, 3, 64, 64)
    x_hat, mu, logvar = m(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (2, 16)
    assert x_hat.abs().max() <= 1
    assert [c.out_channels for c in layers(m.encoder, nn.Conv2d)] == [8, 16, 32]


def test_reparameterisation_uses_noise_scale():
    m = VAE(VAEConfig(width=4, latent_dim=8, noise_scale=0.0))
    mu, logvar = torch.randn(5, 8), torch.zeros(5, 8)
    assert torch.equal(m.reparameterize(mu, logvar), mu)
    m.noise_scale = 1.0
    torch.manual_seed(0)
    z = m.reparameterize(mu, torch.zeros(5, 8))
    torch.manual_seed(0)
    assert torch.allclose(z, mu + torch.randn_like(mu))


def test_dropout_switch(compose_cfg):
    off = build_model(compose_cfg("budget=smoke"), 32)
    assert not layers(off, nn.Dropout)
    on = build_model(compose_cfg("budget=smoke", "dropout=on"), 32)
    drops = layers(on, nn.Dropout)
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)  # 3 encoder + 3 decoder hidden blocks
    x = torch.randn(4, 3, 32, 32)
    on.eval()
    assert torch.equal(on.encoder(x), on.encoder(x)), "dropout is inactive in eval mode"
    on.train()
    torch.manual_seed(0)
    a = on.encoder(x)
    b = on.encoder(x)
    assert not torch.equal(a, b), "dropout is active in train mode"


def test_batchnorm_switch(compose_cfg):
    assert not layers(build_model(compose_cfg("budget=smoke"), 32), nn.BatchNorm2d)
    m = build_model(compose_cfg("budget=smoke", "batchnorm=on"), 32)
    bns = layers(m, nn.BatchNorm2d)
    assert len(bns) == 6
    out_conv, tanh = m.decoder[-2], m.decoder[-1]
    assert isinstance(out_conv, nn.Conv2d) and out_conv.out_channels == 3 and isinstance(tanh, nn.Tanh), \
        "the output layer is a bare conv and Tanh: no batch norm"
    assert [b.num_features for b in bns] == [8, 16, 32, 16, 8, 4]


def test_weight_decay_switch(compose_cfg):
    model = VAE(VAEConfig(width=4, latent_dim=4))
    for option, wd in (("off", 0.0), ("on", 1e-4)):
        s = RunSettings.from_cfg(compose_cfg("budget=smoke", f"weight_decay={option}"))
        opt = make_optimizer(model, s)
        assert isinstance(opt, torch.optim.Adam)
        assert [g["weight_decay"] for g in opt.param_groups] == [wd]


def test_beta_scales_the_kl_term(compose_cfg):
    torch.manual_seed(0)
    x, x_hat = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    one, four = vae_loss(x_hat, x, mu, logvar, 1.0), vae_loss(x_hat, x, mu, logvar, 4.0)
    assert torch.allclose(four.total - one.total, 3 * one.kl)
    assert torch.equal(one.recon, four.recon) and torch.equal(one.kl, four.kl)
    assert torch.allclose(one.kl, kl_per_image(mu, logvar).mean())
    assert torch.allclose(one.recon, ((x_hat - x) ** 2).sum(dim=(1, 2, 3)).mean())
    assert RunSettings.from_cfg(compose_cfg("budget=smoke", "beta=on")).beta == 4.0
    assert RunSettings.from_cfg(compose_cfg("budget=smoke", "beta=off")).beta == 1.0
    # like dropout.p with dropout off, a KL weight set while beta is off does not apply
    assert RunSettings.from_cfg(compose_cfg("budget=smoke", "beta=off", "beta.value=2")).beta == 1.0
    assert RunSettings.from_cfg(compose_cfg("budget=smoke", "beta=on", "beta.value=2")).beta == 2.0


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def test_augmentation_changes_training_batches_only(compose_cfg, tmp_path):
    x = _images()
    plain = list(TrainBatches(x, 16, flip=False, padding=0, seed=1))
    aug = list(TrainBatches(x, 16, flip=True, padding=4, seed=1))
    assert len(plain) == len(aug) == 4
    assert any(not torch.equal(a, p) for a, p in zip(aug, plain))
    # Test batches: always the images themselves, in order, whatever the switch.
    for cfg_opt in ("off", "on"):
        cfg = compose_cfg("budget=smoke", f"augmentation={cfg_opt}")
        s = RunSettings.from_cfg(cfg)
        assert (s.flip, s.crop_padding) == ((True, 4) if cfg_opt == "on" else (False, 0))
        data = ImageData(x, torch.arange(64) % 4, x[:32], torch.arange(32) % 4, ["a", "b", "c", "d"])
        trainer = Trainer(build_model(cfg, 32), data, s, tmp_path, logger=NullLogger())
        assert (trainer.batches.flip, trainer.batches.padding) == (s.flip, s.crop_padding)
        assert torch.equal(torch.cat(list(eval_batches(data.test_x, 10))), to_unit_range(x[:32]))
        trainer.s.epochs = 1
        trainer.fit()
        plain_eval = evaluate(trainer.model, x[:32], s.beta, s.eval_batch_size)
        assert trainer.epoch_rows[-1]["test_recon"] == plain_eval["recon"], "the epoch's test recon is unaugmented"
    assert flags(compose_cfg("augmentation=on"))["augmentation"]


def test_fast_dropout_matches_the_dropout_distribution():
    from ablation.model import Dropout

    torch.manual_seed(0)
    d = Dropout(0.3)
    x = torch.ones(1000, 1000)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.002, "each unit is kept with probability 1-p"
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7)), "kept units are scaled by 1/(1-p)"
    assert abs(y.mean().item() - 1.0) < 0.005, "the expectation is preserved"
    xg = torch.ones(10, 10, requires_grad=True)
    out = d(xg)
    out.sum().backward()
    assert torch.equal(xg.grad, (out.detach() != 0).float() / 0.7), "gradients flow through kept units only"
    d.eval()
    assert torch.equal(d(x), x)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_fast_dropout_masks_are_independent_bernoulli_draws(p):
    """Rate 1-p within 4 sigma, no correlation between neighbours (the four 16-bit words of one
    64-bit draw included), a fresh draw each call, the same draws from the same seed."""
    from ablation.model import Dropout

    d = Dropout(p)
    x = torch.ones(256, 16, 16, 16).contiguous(memory_format=torch.channels_last)  # 1M activations
    torch.manual_seed(1)
    keep = (d(x) != 0).permute(0, 2, 3, 1).reshape(-1).double()  # in memory order
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 4 * sigma
    for lag in (1, 2, 3, 4, 5):  # lag 1-3 share a 64-bit draw, 4 is the next draw's same word
        both = (keep[:-lag] * keep[lag:]).mean().item()
        sigma_both = (1 - p) * ((1 - (1 - p) ** 2) / n) ** 0.5
        assert abs(both - (1 - p) ** 2) < 4.5 * sigma_both, f"lag {lag}"
    again = (d(x) != 0).permute(0, 2, 3, 1).reshape(-1).double()
    assert 0 < (again != keep).double().mean().item(), "every call draws a new mask"
    torch.manual_seed(1)
    assert torch.equal((d(x) != 0).permute(0, 2, 3, 1).reshape(-1).double(), keep), "seeded by torch.manual_seed"


def test_fast_dropout_keeps_the_layout_and_refuses_a_stale_backward():
    from ablation.model import Dropout

    d = Dropout(0.3)
    x = torch.randn(8, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = d(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    z = d(x)  # a second forward pass overwrites the mask the first one saved
    with pytest.raises(RuntimeError, match="inplace operation"):
        y.sum().backward()
    z.sum().backward()
    assert torch.equal(x.grad, (z.detach() != 0).float() / 0.7), "the gradient is the mask z was drawn with"
    odd = torch.randn(3, 5, 7)[:, ::2]  # neither contiguous nor channels_last
    assert d(odd).shape == odd.shape
    clone = copy.deepcopy(d)
    assert clone._mask is None and clone.p == 0.3


def test_fast_dropout_draws_a_smaller_batch_into_the_same_buffers():
    """The last, partial batch of an epoch reuses the full batch's buffers, with the draws a fresh
    layer would make, and the full batch after it still gets a fresh mask of its own."""
    from ablation.model import Dropout

    full = torch.randn(16, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    part = full[:5]
    d = Dropout(0.3)
    d(full)
    buffers = [d._words.data_ptr(), d._keep.data_ptr(), d._mask.data_ptr()]
    torch.manual_seed(3)
    y_part = d(part)
    assert [d._words.data_ptr(), d._keep.data_ptr(), d._mask.data_ptr()] == buffers, "no new buffers"
    assert y_part.shape == part.shape and y_part.is_contiguous(memory_format=torch.channels_last)
    y_full = d(full)
    torch.manual_seed(3)
    fresh = Dropout(0.3)
    assert torch.equal(fresh(part), y_part), "the same draws as a layer that only saw the small batch"
    assert torch.equal(fresh(full), y_full)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_evaluation_folds_batchnorm_without_changing_the_model_or_its_numbers(batchnorm):
    from ablation.evaluate import evaluate, inference_copy

    torch.manual_seed(0)
    model = VAE(VAEConfig(width=8, latent_dim=16, dropout=0.3, batchnorm=batchnorm)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(32, 3, 32, 32) * 2 - 1
    for _ in range(3):  # move the BN statistics and affine parameters away from their initial values
        x_hat, mu, logvar = model(x)
        opt.zero_grad()
        vae_loss(x_hat, x, mu, logvar, 1.0).total.backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = inference_copy(model)
    assert model.training, "the model keeps its mode"
    assert not folded.training
    assert len(layers(folded, nn.BatchNorm2d)) == 0
    assert len(layers(model, nn.BatchNorm2d)) == (6 if batchnorm else 0)
    model.eval()
    with torch.no_grad():
        mu_ref, lv_ref = model.encode(x)
        mu_new, lv_new = folded.encode(x)
        assert torch.allclose(mu_new, mu_ref, rtol=1e-4, atol=1e-5)
        assert torch.allclose(lv_new, lv_ref, rtol=1e-4, atol=1e-5)
        assert torch.allclose(folded.decode(mu_ref), model.decode(mu_ref), rtol=1e-4, atol=1e-5)
    model.train()
    images = ((x + 1) * 127.5).round().to(torch.uint8)
    out = evaluate(model, images, beta=4.0, batch_size=10)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.inference_mode():
        model.eval()
        gen = torch.Generator().manual_seed(1234)
        recon = sum(((model(to_unit_range(images[i:i + 10]), gen)[0] - to_unit_range(images[i:i + 10]))
                     .pow(2).flatten(1).sum(1)).sum().item() for i in range(0, 32, 10))
        model.train()
    assert abs(out["recon"] - recon / 32) < 1e-4 * recon / 32
    # one inference copy can serve several evaluations, with the same numbers as a fresh copy each time
    shared = inference_copy(model)
    assert evaluate(shared, images, beta=4.0, batch_size=10, folded=True) == out
    assert evaluate(shared, images, beta=4.0, batch_size=10, folded=True) == out
    with pytest.raises(ValueError, match="inference_copy"):
        evaluate(model, images, beta=4.0, batch_size=10, folded=True)  # a training-mode model is not a copy


def test_final_metrics_reuse_the_last_epoch_evaluation(compose_cfg, tmp_path, monkeypatch):
    """final() takes the last epoch's test/trainsub evaluation instead of running it again, with
    the same numbers as a fresh final_metrics(); the latent means are never logged as metrics."""
    from ablation.evaluate import final_metrics
    from ablation.wandb_logger import NullLogger

    class Recording(NullLogger):
        def __init__(self):
            self.keys = set()

        def log(self, data, step=None):
            self.keys |= set(data)

    cfg = compose_cfg("budget=smoke", "regularizer=all", "model.width=8", "trainer.epochs=2")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(128) % 4
    data = ImageData(x, y, x[:48], y[:48], ["a", "b", "c", "d"])
    logger = Recording()
    trainer = Trainer(build_model(cfg, 32), data, RunSettings.from_cfg(cfg), tmp_path, logger)
    trainer.fit()
    epoch, test, train = trainer._last_eval
    assert epoch == 2 and test["mu"].shape == (48, cfg.model.latent_dim) and "mu" in train
    assert not any(k.endswith("/mu") for k in logger.keys) and "test/recon" in logger.keys
    import ablation.evaluate as E

    calls = []
    real_evaluate = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: calls.append(a[1].shape[0]) or real_evaluate(*a, **k))
    reused = trainer.final()
    assert calls == [], "final() evaluated again instead of reusing the last epoch's evaluation"
    s = trainer.s
    fresh = final_metrics(trainer.model, data.test_x, data.test_y, trainer.trainsub_x, trainer.trainsub_y,
                          s.beta, s.eval_batch_size, iw_samples=s.iw_samples, iw_images=s.iw_images,
                          sample_images=s.sample_images, seed=s.seed,
                          classifier=load_or_train(trainer.data, s.cache_dir, s.classifier_epochs))
    assert calls == [48, 48], "a fresh final_metrics() evaluates the test set and the train subset"
    assert reused == fresh
    assert reused["test_recon"] == trainer.epoch_rows[-1]["test_recon"]
