"""The regularizers of the ablation, each declared once, here.

A regularizer is a Hydra config group (conf/<group>/{on,off}.yaml, holding only `enabled`)
and an entry of `REGISTRY`: its group name, the short tag used in run names, a table label,
where it acts, and its schema, whose defaults are the seed report's values. "Off" is stored
once, as `enabled: false`; the values a run actually uses come from `effective`, which gives
a group's `off` values while it is off, so `beta=off beta.value=2` trains with beta 1.

    weight_decay  wd    optimizer  L2 weight decay 1e-4 in Adam
    dropout       do    model      Dropout(p=0.3) after each hidden block
    batchnorm     bn    model      BatchNorm2d after each hidden conv/deconv
    beta          beta  objective  the KL weighted by 4
    augmentation  aug   data       random horizontal flip + random crop (zero padding 4)

Run names (`wd-do-bn-beta-aug_seed0`, `none_seed0`), the analysis's flags and factorial
factors, and the presets' validation are all derived from `REGISTRY` in this order. Adding a
regularizer: a YAML group, a `register(...)` entry, and the code where it acts (docs/adding-a-regularizer.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

ACTS_ON = ("model", "objective", "optimizer", "data")


@dataclass
class WeightDecayConfig:
    enabled: bool = False
    value: float = 1e-4  # Adam weight_decay (L2 added to the gradient)


@dataclass
class DropoutConfig:
    enabled: bool = False
    p: float = 0.3  # dropout probability after each hidden block


@dataclass
class BatchNormConfig:
    enabled: bool = False  # BatchNorm2d after each hidden conv/deconv


@dataclass
class BetaConfig:
    enabled: bool = False
    value: float = 4.0  # KL weight, in training and evaluation alike


@dataclass
class AugmentationConfig:
    enabled: bool = False
    flip: bool = True  # random horizontal flip, p=0.5
    crop_padding: int = 4  # random crop back to the image size after padding by this many pixels
    pad_mode: str = "zeros"  # the crop's padding: zeros (the seed's) | reflect


@dataclass(frozen=True)
class Regularizer:
    """One regularizer: its config group, run-name tag, label, where it acts and its schema."""

    group: str  # config group and column name: `dropout`
    tag: str  # code in run names: `do`
    label: str  # human name in tables and figures
    acts_on: str  # one of ACTS_ON
    schema: type  # dataclass with `enabled` and the seed's values as defaults
    off: Mapping[str, Any]  # the values that make the group a no-op, used while it is off


REGISTRY: dict[str, Regularizer] = {}


def register(reg: Regularizer) -> Regularizer:
    """Add `reg` to the registry (after the others); its group and tag must be new."""
    if reg.group in REGISTRY or reg.tag in {r.tag for r in REGISTRY.values()} or reg.tag == "none" or "-" in reg.tag or "_" in reg.tag:
        raise ValueError(f"regularizer {reg.group!r} (tag {reg.tag!r}): the group and the tag must be unique, "
                         f"and the tag may not be 'none' or contain '-' or '_'")
    if reg.acts_on not in ACTS_ON:
        raise ValueError(f"regularizer {reg.group!r}: acts_on={reg.acts_on!r} is not one of {', '.join(ACTS_ON)}")
    fields = {f.name for f in dataclasses.fields(reg.schema)}
    if "enabled" not in fields or not set(reg.off) <= fields:
        raise ValueError(f"regularizer {reg.group!r}: its schema needs `enabled`, and `off` may name only its fields")
    REGISTRY[reg.group] = reg
    return reg


register(Regularizer("weight_decay", "wd", "weight decay", "optimizer", WeightDecayConfig, {"value": 0.0}))
register(Regularizer("dropout", "do", "dropout", "model", DropoutConfig, {"p": 0.0}))
register(Regularizer("batchnorm", "bn", "batchnorm", "model", BatchNormConfig, {}))
register(Regularizer("beta", "beta", "β", "objective", BetaConfig, {"value": 1.0}))
register(Regularizer("augmentation", "aug", "augmentation", "data", AugmentationConfig,
                     {"flip": False, "crop_padding": 0}))


def names() -> tuple[str, ...]:
    """The config groups of the registered regularizers, in registry order."""
    return tuple(REGISTRY)


def tags() -> tuple[str, ...]:
    return tuple(r.tag for r in REGISTRY.values())


def as_bool(value: Any) -> bool:
    """True for True, 1 (numpy's too) and any spelling of "true"; False for everything else (NaN, None, NA)."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    try:
        return bool(value == 1)
    except TypeError:  # pandas' NA
        return False


def combo_name(flags: Mapping[str, Any]) -> str:
    """`none`, or the tags of the regularizers that are on joined by '-': `wd-bn`."""
    return "-".join(r.tag for r in REGISTRY.values() if as_bool(flags.get(r.group, False))) or "none"


def run_name(flags: Mapping[str, Any], seed: Any) -> str:
    """The run directory's name: `wd-do-bn-beta-aug_seed0`, `none_seed0`."""
    return f"{combo_name(flags)}_seed{seed}"


def parse_run_name(name: str) -> dict:
    """The seed and every registered flag encoded in a run name; empty if `name` is not one."""
    stem, sep, seed = name.rpartition("_seed")
    codes = stem.split("-") if stem != "none" else []
    known = tags()
    if not sep or not seed.isdigit() or not stem or not set(codes) <= set(known) or len(set(codes)) != len(codes):
        return {}
    return {"seed": int(seed), **{r.group: r.tag in codes for r in REGISTRY.values()}}


def flags(cfg: Mapping) -> dict[str, bool]:
    """The registered regularizers' switches of a config, as booleans."""
    return {g: as_bool(cfg[g]["enabled"]) for g in REGISTRY}


def effective(cfg: Mapping) -> SimpleNamespace:
    """The values a run uses, per group: the group's own while it is on, its `off` values while off.

    `effective(cfg).dropout.p` is 0.0 for `dropout=off` whatever `dropout.p` says; a value a config
    lacks is the schema's default (the seed's). Each group is an
    instance of its schema, so `dataclasses.asdict` gives it back as a dict (the config hash does).
    """
    groups = {}
    for reg in REGISTRY.values():
        node = cfg[reg.group]
        values = {f.name: node.get(f.name, f.default) for f in dataclasses.fields(reg.schema)}
        if not as_bool(values["enabled"]):
            values |= dict(reg.off)
        groups[reg.group] = reg.schema(**values)
    return SimpleNamespace(**groups)


def effective_dict(cfg: Mapping) -> dict[str, dict]:
    """`effective(cfg)` as plain dicts, group by group: what the config hash and W&B record."""
    return {group: dataclasses.asdict(values) for group, values in vars(effective(cfg)).items()}


def run_name_resolver(*, _root_) -> str:
    """OmegaConf resolver `${run_name:}`: the run name of the config it sits in."""
    return run_name(flags(_root_), _root_.seed)
