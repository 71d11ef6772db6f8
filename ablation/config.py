"""Config schemas: typed dataclasses registered in Hydra's ConfigStore.

The primary config (conf/config.yaml) starts its defaults list with `base_config`,
the `Config` dataclass below, so every field has a type and the config is in struct
mode: a wrong type (`trainer.epochs=abc`) or an unknown key (`trainer.epoch=3`) fails
at composition with Hydra's own message, before any data is loaded. A key that `+` adds
(`+dropuot=on`) is refused by `validate`, and the command line refuses both kinds first
with one line naming the closest valid key (`unknown_key_error`).

The YAML files hold the values; these classes hold the types and the documented
defaults. Ranges that a type cannot express are checked by `validate`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from . import regularizers as R

# conf/ sits beside the package in a checkout; an installed wheel holds it inside (pyproject.toml).
_PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE_DIR / "conf" if (_PACKAGE_DIR / "conf").is_dir() else _PACKAGE_DIR.parent / "conf"


class ConfigError(ValueError):
    """A bad setting, reported to the user as one paragraph naming the field and the fix."""


@dataclass
class BudgetConfig:
    name: str = MISSING  # auto | paper | cpu | smoke
    epochs: int = MISSING  # training epochs
    width: int = MISSING  # base channels of the model (the seed: 128)
    train_size: Optional[int] = None  # class-stratified training subset; null = all
    test_size: Optional[int] = None  # class-stratified test subset; null = all


@dataclass
class ModelConfig:
    width: int = II("budget.width")  # base channels: encoder w,2w,4w; decoder 4w,2w,w,w/2
    latent_dim: int = 128  # size of z (the seed: 128)
    noise_scale: float = 0.3  # z = mu + noise_scale*eps*std; the seed uses 0.3, 1.0 is the textbook VAE


@dataclass
class DataConfig:
    root: str = "${oc.env:ABLATION_DATA,data/cifar10}"  # CIFAR-10 dir, ImageFolder dir, or .tar.gz of either
    download: bool = True  # let torchvision download CIFAR-10 when root is absent
    cache_dir: str = "${oc.env:ABLATION_CACHE,${oc.env:HOME,.}/.cache/vae-ablation}"  # decoded uint8 tensors
    train_size: Optional[int] = II("budget.train_size")  # class-stratified subset; null = all
    test_size: Optional[int] = II("budget.test_size")  # class-stratified subset; null = all
    subset_seed: int = 0  # fixes which images the subsets hold (same for every run)
    val_size: Optional[int] = None  # class-stratified validation images carved from the training set; null = none


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam learning rate (the seed's)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas


@dataclass
class TrainerConfig:
    epochs: int = II("budget.epochs")  # training epochs
    batch_size: int = 128  # training batch (the seed's)
    eval_batch_size: int = 256  # evaluation batch (fastest of 128-1000 on 2 CPU cores at width 32)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA with bf16 support, else fp32) | fp32 | bf16 (also CPUs with bf16 ops)
    compile: bool = False  # torch.compile the model (CUDA only)
    threads: int = 0  # torch CPU threads; 0 = cores / parallel jobs of the launcher
    log_interval: int = 10  # steps between step-level history rows; with W&B, the smaller of this and logger.log_interval
    image_interval: int = 5  # epochs between reconstruction grids (and the last epoch)
    checkpoint: bool = True  # save resumable checkpoints (at epoch ends, see checkpoint_every_s)
    checkpoint_every_s: float = 120.0  # least seconds between two checkpoints; 0 = after every epoch
    progress_every_s: float = 30.0  # seconds between progress lines off a terminal (a bar on one); 0 = neither
    # Unix time by which the run stops cleanly between epochs with a checkpoint (a rerun resumes it);
    # a run that its study's finished runs say would not end before it does not start. null = none.
    deadline: Optional[float] = "${oc.env:ABLATION_DEADLINE,null}"


@dataclass
class EvalConfig:
    """The end-of-run measures beyond the per-epoch evaluation (ablation/measures.py)."""

    iw_samples: int = 64  # importance samples per image of the likelihood bound
    iw_images: Optional[int] = 2000  # test images the bound is computed on (class-stratified); null = all
    sample_images: int = 5000  # prior samples for sample quality (FD, KID, precision/recall) and sharpness
    classifier_epochs: int = 15  # epochs of the suite's CIFAR classifier (trained once per dataset, cached)
    inception_weights: Optional[str] = None  # local Inception-v3 weights file for FID/KID; null = not computed
    spike_k: float = 5.0  # a loss or KL spike: a step row above its rolling median + spike_k * noise (metrics.py)
    spike_window: int = 25  # step rows in the rolling window of the spike detector


@dataclass
class LoggerConfig:
    backend: str = "none"  # wandb | none
    project: str = "vae-ablation"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); null = your default
    mode: str = "auto"  # auto | online | offline | disabled; WANDB_MODE wins when set
    tags: List[str] = field(default_factory=list)  # extra tags beside the active regularizers
    log_interval: int = 10  # steps between step-level W&B logs
    image_interval: int = 1  # epochs between reconstruction images
    log_model: bool = False  # upload model.pt as a W&B artifact
    init_timeout: float = 60.0  # seconds before an online init falls back to offline


@dataclass
class BaseConfig:
    study: str = "main"  # results/<study>/ and the W&B group
    seed: int = 0  # seed of torch, numpy and random
    overwrite: bool = False  # replace a run directory holding a different config
    results_dir: str = "results"  # root of all studies
    run_name: str = MISSING  # regularizers + seed, from the `run_name` resolver
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def schema() -> type:
    """The primary config's schema: BaseConfig plus one field per registered regularizer."""
    groups = [(r.group, r.schema, field(default_factory=r.schema)) for r in R.REGISTRY.values()]
    return make_dataclass("Config", groups, bases=(BaseConfig,))


# conf/hydra/launcher/*.yaml share their names with the launcher plugins' schemas, so Hydra
# validates our presets against those schemas (which we want) and warns that it does so.
warnings.filterwarnings("ignore", message=r"\s*\S+ is validated against ConfigStore schema with the same name")


def half_fraction(*switches) -> bool:
    """The generator of a 2^(k-1) resolution-(k) half fraction: on exactly when the product of the other
    factors in -1/+1 coding is +1, i.e. when an even number of them is off (conf/sweep/half_factorial.yaml)."""
    return sum(not R.as_bool(s) for s in switches) % 2 == 0


def auto_budget() -> str:
    """The preset that budget=auto composes on this machine (conf/budget/auto.yaml): paper with CUDA,
    cpu without."""
    return "paper" if torch.cuda.is_available() else "cpu"


def register() -> None:
    """Register the schema (with the regularizers registered so far) and the resolvers; call again
    after registering another regularizer."""
    ConfigStore.instance().store(name="base_config", node=schema())
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", R.run_name_resolver)
    if not OmegaConf.has_resolver("half_fraction"):
        OmegaConf.register_new_resolver("half_fraction", half_fraction)
    if not OmegaConf.has_resolver("auto_budget"):
        OmegaConf.register_new_resolver("auto_budget", auto_budget)


register()


def resolve_budget(cfg: DictConfig, cuda: bool) -> str:
    """Name an `auto` budget after the preset for the run's device: `paper` (CUDA) or `cpu`.

    Composition filled it from `auto_budget()`, i.e. from whether this machine has CUDA. When the
    run's device says otherwise (trainer.device=cpu on a GPU machine), the fields still at that
    preset's values are refilled from the other one; fields set to other values are kept.
    Returns the name of the preset chosen (the budget's own name when not auto).
    """
    if cfg.budget.name != "auto":
        return cfg.budget.name
    chosen, composed = ("paper" if cuda else "cpu"), auto_budget()
    if chosen != composed:
        old, new = (OmegaConf.load(CONF_DIR / "budget" / f"{name}.yaml") for name in (composed, chosen))
        for key, value in new.items():
            if key != "name" and cfg.budget[key] == old[key]:
                cfg.budget[key] = value
    cfg.budget.name = chosen
    return chosen


def _keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The keys of a config as dotted paths, sections included (`trainer`, `trainer.epochs`), Hydra's own
    node left out."""
    keys = []
    for key in node:
        if prefix or key != "hydra":
            keys.append(f"{prefix}{key}")
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                keys += _keys(child, f"{prefix}{key}.")
    return keys


def schema_keys() -> list[str]:
    """Every key of the schema as a dotted path, sections included."""
    return _keys(OmegaConf.structured(schema()))


def unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    """The one-line error for a key outside the schema, naming the closest valid one (difflib): among the
    keys with the same last part if there are any (trainer.lr -> optim.lr), else among all of them."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0) or difflib.get_close_matches(key, valid, n=1)
    if not close:
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1)]
    hint = f"did you mean {close[0]}?" if close else "no key is close to it"
    return ConfigError(f"unknown key {key!r} ({hint}); `--cfg job` lists every key")


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key that the schema lacks: `+dropuot=on` adds one to the composed config, and so would a
    YAML file of a group; raise ConfigError for the first, naming the closest valid key."""
    valid = schema_keys()
    known = set(valid)
    for key in _keys(cfg):
        if key not in known:
            raise unknown_key_error(key, valid)


def validate(cfg: DictConfig) -> None:
    """Check the keys against the schema and the ranges a type cannot express; raise ConfigError naming
    the field and the fix."""
    check_known_keys(cfg)
    checks = [
        (0.0 <= cfg.dropout.p < 1.0, f"dropout.p={cfg.dropout.p} is outside [0, 1); use e.g. dropout.p=0.3"),
        (cfg.beta.value >= 0, f"beta.value={cfg.beta.value} is negative; the KL weight must be >= 0 (e.g. beta.value=4)"),
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0 (the seed uses optim.lr=1e-3)"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1) (Adam's default: optim.betas=[0.9,0.999])"),
        (cfg.weight_decay.value >= 0, f"weight_decay.value={cfg.weight_decay.value} must be >= 0"),
        (cfg.model.width >= 1, f"model.width={cfg.model.width} must be >= 1 (the seed uses 128)"),
        (cfg.model.latent_dim >= 1, f"model.latent_dim={cfg.model.latent_dim} must be >= 1 (the seed uses 128)"),
        (cfg.model.noise_scale >= 0, f"model.noise_scale={cfg.model.noise_scale} must be >= 0 (seed 0.3, textbook 1.0)"),
        (cfg.trainer.epochs >= 1, f"trainer.epochs={cfg.trainer.epochs} must be >= 1"),
        (cfg.trainer.batch_size >= 1, f"trainer.batch_size={cfg.trainer.batch_size} must be >= 1"),
        (cfg.trainer.eval_batch_size >= 1, f"trainer.eval_batch_size={cfg.trainer.eval_batch_size} must be >= 1"),
        (cfg.trainer.log_interval >= 1, f"trainer.log_interval={cfg.trainer.log_interval} must be >= 1"),
        (cfg.trainer.image_interval >= 1, f"trainer.image_interval={cfg.trainer.image_interval} must be >= 1"),
        (cfg.trainer.threads >= 0, f"trainer.threads={cfg.trainer.threads} must be >= 0 (0 = automatic)"),
        (cfg.trainer.progress_every_s >= 0, f"trainer.progress_every_s={cfg.trainer.progress_every_s} must be >= 0 (0 = off)"),
        (cfg.augmentation.crop_padding >= 0, f"augmentation.crop_padding={cfg.augmentation.crop_padding} must be >= 0"),
        (cfg.augmentation.pad_mode in ("zeros", "reflect"),
         f"augmentation.pad_mode={cfg.augmentation.pad_mode!r} is not one of zeros, reflect"),
        (cfg.trainer.precision in ("auto", "fp32", "bf16"),
         f"trainer.precision={cfg.trainer.precision!r} is not one of auto, fp32, bf16"),
        (cfg.logger.backend in ("wandb", "none"), f"logger.backend={cfg.logger.backend!r} is not one of wandb, none"),
        (cfg.logger.log_interval >= 1, f"logger.log_interval={cfg.logger.log_interval} must be >= 1"),
        (cfg.logger.image_interval >= 1, f"logger.image_interval={cfg.logger.image_interval} must be >= 1"),
        (cfg.logger.mode in ("auto", "online", "offline", "disabled"),
         f"logger.mode={cfg.logger.mode!r} is not one of auto, online, offline, disabled"),
    ]
    checks += [
        (cfg.eval.iw_samples >= 1, f"eval.iw_samples={cfg.eval.iw_samples} must be >= 1 (e.g. eval.iw_samples=64)"),
        (cfg.eval.sample_images >= 2, f"eval.sample_images={cfg.eval.sample_images} must be >= 2"),
        (cfg.eval.classifier_epochs >= 1, f"eval.classifier_epochs={cfg.eval.classifier_epochs} must be >= 1"),
        (cfg.eval.spike_k > 0, f"eval.spike_k={cfg.eval.spike_k} must be > 0 (e.g. eval.spike_k=5)"),
        (cfg.eval.spike_window >= 3, f"eval.spike_window={cfg.eval.spike_window} must be >= 3"),
    ]
    for size in ("train_size", "test_size", "val_size"):
        value = cfg.data[size]
        checks.append((value is None or value >= 1, f"data.{size}={value} must be >= 1, or null "
                                                    f"({'none' if size == 'val_size' else 'the whole split'})"))
    iw = cfg.eval.iw_images
    checks.append((iw is None or iw >= 1, f"eval.iw_images={iw} must be >= 1, or null for every test image"))
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise ConfigError("Invalid configuration: " + "; ".join(errors) + ".")


def _hash(container: dict) -> str:
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Fields that never change what a run computes: where it is written, how it is logged (but
# see step_row_interval), whether an old directory may be replaced, how many CPU threads it uses, when
# it checkpoints and by when it must stop.
_NOT_HASHED = ("logger", "overwrite", "results_dir", "study", "run_name")
_NOT_HASHED_TRAINER = ("threads", "checkpoint_every_s", "deadline", "progress_every_s")


def step_row_interval(cfg: DictConfig) -> int:
    """Steps between the step rows of history.csv: trainer.log_interval, or with W&B the smaller of
    it and logger.log_interval (W&B logs from the same rows)."""
    if cfg.logger.backend == "wandb":
        return min(cfg.trainer.log_interval, cfg.logger.log_interval)
    return cfg.trainer.log_interval


def _hashed(cfg: DictConfig) -> dict:
    """The resolved config with the step-row interval the logger may shorten, and each regularizer
    group at its effective values (an off group's values do nothing, so they are not hashed).
    The budget preset is left out: its values reach a run only through trainer.epochs, model.width and
    data.train_size/test_size, which are hashed, so budget.epochs=5 and trainer.epochs=5 hash alike."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("budget", None)
    container["trainer"]["log_interval"] = step_row_interval(cfg)
    container |= R.effective_dict(cfg)
    return container


def hashed_config(cfg: DictConfig) -> dict:
    """What config_hash hashes: the resolved config less the fields that cannot change a run's results."""
    container = _hashed(cfg)
    for key in _NOT_HASHED:
        container.pop(key, None)
    for key in _NOT_HASHED_TRAINER:
        container["trainer"].pop(key, None)
    container["data"].pop("cache_dir", None)
    return container


def config_hash(cfg: DictConfig) -> str:
    """Hash of the full resolved config that determines a run's results."""
    return _hash(hashed_config(cfg))


def settings_hash(cfg: DictConfig) -> str:
    """Hash of the non-regularizer settings: runs are only pooled when this matches."""
    container = _hashed(cfg)
    for key in (*_NOT_HASHED, *R.names(), "seed"):
        container.pop(key, None)
    for key in _NOT_HASHED_TRAINER:
        container["trainer"].pop(key, None)
    container["data"].pop("cache_dir", None)
    container["data"].pop("root", None)
    return _hash(container)


def current_settings_hash(config_yaml: str | Path, recorded: str | None) -> str | None:
    """A run's settings_hash by today's function, from its stored config.yaml; the hash it recorded where that
    file is unusable (stored_config), and None for a run that recorded none."""
    stored = stored_config(config_yaml) if recorded else None
    return settings_hash(stored) if stored is not None else recorded


def stored_config(path: str | Path) -> DictConfig | None:
    """A run's stored config.yaml on the current schema's defaults (fields added since it was written
    take their defaults), so that today's config_hash/settings_hash can hash it; None when absent or
    unreadable, when it lacks a whole top-level field of the schema (not a run's resolved config), or
    when it holds a field the schema no longer has."""
    try:
        stored = OmegaConf.load(path)
        if not all(f.name in stored for f in fields(schema())):
            return None
        return OmegaConf.merge(OmegaConf.structured(schema()), stored)
    except Exception:  # YAML, type and key errors alike: no usable stored config
        return None
