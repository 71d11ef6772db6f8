"""Fault injection for the tests' training subprocesses, loaded at interpreter start-up.

A test puts this folder on PYTHONPATH and sets ABLATION_FAULT=<kind>:<seed>; the run with
that seed then fails at its first training step, through the real loop:
    nan_loss  the loss of the first step is NaN (the run diverges)
    raise     the first epoch raises RuntimeError("injected fault ...") (the run fails)
Processes without ABLATION_FAULT import nothing.
"""
import os

_spec = os.environ.get("ABLATION_FAULT")
if _spec:
    import ablation.trainer as _trainer

    _kind, _, _seed = _spec.partition(":")
    _train_epoch, _vae_loss = _trainer.Trainer.train_epoch, _trainer.vae_loss

    def _nan_loss(*args, **kwargs):
        parts = _vae_loss(*args, **kwargs)
        return type(parts)(parts.total * float("nan"), parts.recon, parts.kl)

    def _faulty_epoch(self):
        if self.s.seed != int(_seed) or self.epoch != 0:
            return _train_epoch(self)
        if _kind == "raise":
            raise RuntimeError(f"injected fault (ABLATION_FAULT={_spec}) at epoch 1")
        _trainer.vae_loss = _nan_loss
        try:
            return _train_epoch(self)
        finally:
            _trainer.vae_loss = _vae_loss

    _trainer.Trainer.train_epoch = _faulty_epoch
