"""Every config group option and preset composes and resolves to the documented values."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ablation import config as C
from ablation import regularizers as R
from ablation.runtime import Runtime, cpu_has_native_bf16, resolve_precision

REGULARIZERS = R.names()

# The table of the README: (group, option) -> the values a run uses under that group.
TABLE = {
    ("weight_decay", "off"): {"enabled": False, "value": 0.0},
    ("weight_decay", "on"): {"enabled": True, "value": 1e-4},
    ("dropout", "off"): {"enabled": False, "p": 0.0},
    ("dropout", "on"): {"enabled": True, "p": 0.3},
    ("batchnorm", "off"): {"enabled": False},
    ("batchnorm", "on"): {"enabled": True},
    ("beta", "off"): {"enabled": False, "value": 1.0},
    ("beta", "on"): {"enabled": True, "value": 4.0},
    ("augmentation", "off"): {"enabled": False, "flip": False, "crop_padding": 0, "pad_mode": "zeros"},
    ("augmentation", "on"): {"enabled": True, "flip": True, "crop_padding": 4, "pad_mode": "zeros"},
}


@pytest.mark.parametrize("group,option", sorted(TABLE))
def test_group_option_resolves_to_table(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    assert dataclasses.asdict(getattr(R.effective(cfg), group)) == TABLE[(group, option)]
    for other in REGULARIZERS:
        if other != group:
            assert cfg[other].enabled is False, "the other groups default to off"


def _expected_presets():
    yield "none", set()
    yield "all", set(REGULARIZERS)
    for r in REGULARIZERS:
        yield f"only_{r}", {r}
        yield f"without_{r}", set(REGULARIZERS) - {r}


PRESETS = list(_expected_presets())


def test_twelve_presets_exist():
    assert len(PRESETS) == 12
    assert {p.stem for p in (C.CONF_DIR / "regularizer").glob("*.yaml")} == {name for name, _ in PRESETS}


@pytest.mark.parametrize("preset,active", PRESETS, ids=[p for p, _ in PRESETS])
def test_preset_sets_all_five(compose_cfg, preset, active):
    cfg = compose_cfg(f"regularizer={preset}")
    assert R.flags(cfg) == {r: r in active for r in REGULARIZERS}
    for r in REGULARIZERS:
        assert dataclasses.asdict(getattr(R.effective(cfg), r)) == TABLE[(r, "on" if r in active else "off")]


def test_command_line_group_wins_over_preset(compose_cfg):
    cfg = compose_cfg("regularizer=all", "dropout=off", "beta=off")
    assert R.flags(cfg) == {"weight_decay": True, "dropout": False, "batchnorm": True, "beta": False,
                            "augmentation": True}
    cfg = compose_cfg("regularizer=none", "batchnorm=on")
    assert R.flags(cfg)["batchnorm"] is True and sum(R.flags(cfg).values()) == 1


def test_quoted_on_off_everywhere():
    """YAML 1.1 reads bare on/off as booleans: every YAML file must quote them."""
    import re

    bare = re.compile(r"(:|-)\s*(on|off)\s*(,|$|#)", re.IGNORECASE | re.MULTILINE)
    for path in C.CONF_DIR.rglob("*.yaml"):
        assert not bare.search(path.read_text()), f"unquoted on/off in {path}"


def test_run_name_from_flags_and_seed(compose_cfg):
    assert compose_cfg("regularizer=none", "seed=3").run_name == "none_seed3"
    assert compose_cfg("regularizer=all").run_name == "wd-do-bn-beta-aug_seed0"
    assert compose_cfg("dropout=on", "beta=on").run_name == "do-beta_seed0"


def test_output_dirs_are_deterministic(compose_cfg):
    cfg = compose_cfg("regularizer=only_beta", "seed=2", "study=s1", "results_dir=/r", hydra_cfg=True)
    assert cfg.hydra.sweep.dir == "/r/s1"
    assert cfg.hydra.sweep.subdir == "beta_seed2"
    assert cfg.hydra.run.dir == "/r/s1/beta_seed2"


def test_factorial_sweep_covers_all_32_combinations(compose_cfg):
    cfg = compose_cfg("+sweep=factorial", hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == set(REGULARIZERS)
    values = {k: [v.strip().strip("'") for v in params[k].split(",")] for k in params}
    assert all(sorted(v) == ["off", "on"] for v in values.values())
    combos = list(itertools.product(*values.values()))
    assert len(combos) == 32


def test_budget_presets(compose_cfg):
    for name in ("paper", "cpu", "smoke"):
        cfg = compose_cfg(f"budget={name}")
        assert cfg.trainer.epochs == cfg.budget.epochs and cfg.model.width == cfg.budget.width
    paper = compose_cfg("budget=paper")
    assert (paper.budget.epochs, paper.model.width, paper.data.train_size) == (50, 128, None)


def test_auto_budget_picks_by_device(compose_cfg):
    cfg = compose_cfg()
    assert cfg.budget.name == "auto"
    assert C.resolve_budget(cfg, cuda=False) == "cpu"
    assert cfg.trainer.epochs == OmegaConf.load(C.CONF_DIR / "budget/cpu.yaml").epochs
    cfg = compose_cfg("budget.epochs=7")
    assert C.resolve_budget(cfg, cuda=True) == "paper"
    assert cfg.trainer.epochs == 7 and cfg.model.width == 128, "explicit fields win over the preset"


def test_defaults_match_the_seed(compose_cfg):
    cfg = compose_cfg("budget=paper")
    assert cfg.model.latent_dim == 128 and cfg.model.noise_scale == 0.3 and cfg.model.width == 128
    assert cfg.optim.lr == 1e-3 and cfg.trainer.batch_size == 128
    assert OmegaConf.to_container(cfg.data, resolve=False)["root"] == "${oc.env:ABLATION_DATA,data/cifar10}"


@pytest.mark.parametrize("override,fragment", [
    ("trainer.epoch=3", "trainer.epoch"),  # unknown key
    ("trainer.epochs=abc", "trainer.epochs"),  # wrong type
    ("dropout.q=0.5", "dropout.q"),
    ("seed=one", "seed"),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(compose_cfg, override, fragment):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    assert fragment in str(info.value) + str(info.value.__cause__)


def test_unknown_option_lists_the_choices(compose_cfg):
    with pytest.raises(Exception) as info:
        compose_cfg("dropout=maybe")
    text = str(info.value)
    assert "dropout/maybe" in text and "on" in text and "off" in text


@pytest.mark.parametrize("override,message", [
    ("dropout.p=1.5", "dropout.p=1.5 is outside [0, 1)"),
    ("dropout.p=-0.1", "outside [0, 1)"),
    ("beta.value=-1", "beta.value=-1.0 is negative"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("model.width=0", "model.width=0 must be >= 1"),
    ("model.latent_dim=0", "model.latent_dim=0 must be >= 1"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("logger.log_interval=0", "logger.log_interval=0 must be >= 1"),
    ("logger.image_interval=0", "logger.image_interval=0 must be >= 1"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1)"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
])
def test_out_of_range_values_are_refused(compose_cfg, override, message):
    cfg = compose_cfg("budget=smoke", override)
    with pytest.raises(C.ConfigError) as info:
        C.validate(cfg)
    assert message in str(info.value)


def test_config_hash_ignores_logging_but_not_settings(compose_cfg):
    base = compose_cfg("budget=smoke")
    h = C.config_hash(base)
    assert C.config_hash(compose_cfg("budget=smoke", "logger=none", "study=x")) == h
    assert C.config_hash(compose_cfg("budget=smoke", "trainer.epochs=3")) != h
    assert C.config_hash(compose_cfg("budget=smoke", "dropout=on")) != h
    # W&B's log interval shortens the step rows of history.csv when it is the smaller one
    assert C.config_hash(compose_cfg("budget=smoke", "logger.log_interval=20")) == h
    assert C.config_hash(compose_cfg("budget=smoke", "logger.log_interval=5")) != h
    assert C.config_hash(compose_cfg("budget=smoke", "logger.log_interval=5", "trainer.log_interval=5")) == \
        C.config_hash(compose_cfg("budget=smoke", "trainer.log_interval=5", "logger=none"))
    s = C.settings_hash(base)
    assert C.settings_hash(compose_cfg("budget=smoke", "logger.log_interval=5")) != s
    assert C.settings_hash(compose_cfg("budget=smoke", "regularizer=all", "seed=4")) == s
    assert C.settings_hash(compose_cfg("budget=smoke", "model.width=16")) != s


def test_precision_resolves_per_device_and_refuses_emulated_bf16(compose_cfg):
    import torch

    cpu = torch.device("cpu")
    cfg = compose_cfg("budget=smoke", "trainer.precision=bf16", "trainer.compile=true")  # the flags compose
    assert cfg.trainer.precision == "bf16" and cfg.trainer.compile is True
    C.validate(cfg)
    # auto stays fp32 on the CPU even with bf16 instructions: the CPU study's figures are fp32
    assert resolve_precision("auto", cpu, native_bf16=True) == "fp32"
    assert resolve_precision("fp32", cpu, native_bf16=True) == "fp32"
    assert resolve_precision("bf16", cpu, native_bf16=True) == "bf16"
    with pytest.raises(C.ConfigError) as info:
        resolve_precision("bf16", cpu, native_bf16=False)
    assert "needs bf16 instructions" in str(info.value) and "AVX512-BF16 or AMX" in str(info.value)
    assert "use trainer.precision=fp32" in str(info.value)
    assert Runtime(cpu, resolve_precision("auto", cpu), 1).autocast_factory is None
    assert Runtime(cpu, resolve_precision("fp32", cpu), 1).autocast_factory is None


def test_bf16_on_a_cpu_with_bf16_runs_the_convolutions_in_bf16():
    import torch

    if not cpu_has_native_bf16():
        with pytest.raises(C.ConfigError, match="needs bf16 instructions"):
            resolve_precision("bf16", torch.device("cpu"))
        return
    autocast = Runtime(torch.device("cpu"), resolve_precision("bf16", torch.device("cpu")), 1).autocast_factory
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast():
        y = conv(torch.rand(2, 3, 8, 8))
    assert y.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32


def test_auto_precision_is_hashed_as_it_resolves(compose_cfg):
    """trainer.precision=auto is fp32 on a CPU and bf16 on a bf16 GPU: two trainings, two hashes."""
    from ablation.runtime import prepare

    cfg = compose_cfg("budget=smoke", "trainer.device=cpu")
    runtime, _ = prepare(cfg)
    assert runtime.precision == "fp32" and cfg.trainer.precision == "fp32", "recorded as resolved"
    gpu = compose_cfg("budget=smoke", "trainer.device=cpu")
    prepare(gpu)
    gpu.trainer.precision = "bf16"  # what prepare() records for auto on a GPU with bf16
    assert C.config_hash(gpu) != C.config_hash(cfg) and C.settings_hash(gpu) != C.settings_hash(cfg)


def _grid(compose_cfg, sweep: str) -> list[tuple[object, list[str]]]:
    """Every grid point of a sweep preset as (composed config, its overrides), as the basic sweeper expands it."""
    params = compose_cfg(f"+sweep={sweep}", hydra_cfg=True).hydra.sweeper.params
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    return [(compose_cfg("budget=smoke", f"+sweep={sweep}", *point, hydra_cfg=True), list(point))
            for point in itertools.product(*axes)]


def test_the_half_fraction_is_resolution_five(compose_cfg):
    grid = _grid(compose_cfg, "half_factorial")
    cells = [tuple(R.flags(cfg).values()) for cfg, _ in grid]
    assert len(grid) == 16 and len(set(cells)) == 16
    coded = np.array([[1 if on else -1 for on in cell] for cell in cells])
    assert (coded.prod(axis=1) == 1).all(), "defining relation I = ABCDE"
    for i, j in itertools.combinations(range(5), 2):  # main effects and two-factor interactions all orthogonal
        assert coded[:, i] @ coded[:, j] == 0
    assert len({cfg.run_name for cfg, _ in grid}) == 16


@pytest.mark.parametrize("sweep,key,expected", [
    ("dose_beta", "beta.value", [1.0, 2.0, 4.0, 8.0]),
    ("dose_dropout", "dropout.p", [0.1, 0.3, 0.5]),
    ("dose_weight_decay", "weight_decay.value", [1e-5, 1e-4, 1e-3]),
])
def test_dose_sweeps_compose_to_their_strengths(compose_cfg, sweep, key, expected):
    grid = _grid(compose_cfg, sweep)
    group, field = key.split(".")
    got = [getattr(getattr(R.effective(cfg), group), field) for cfg, _ in grid]
    assert got == expected
    assert all(R.flags(cfg) == {g: g == group for g in R.names()} for cfg, _ in grid), "everything else off"
    dirs = {OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] for cfg, _ in grid}
    assert len(dirs) == 1 and f"${{{key}}}" in dirs.pop(), "each strength gets its own run directory"


def test_augmentation_variants_compose(compose_cfg):
    variants = {}
    for cfg, point in _grid(compose_cfg, "dose_augmentation"):
        aug = R.effective(cfg).augmentation
        variants[point[0]] = (aug.enabled, aug.flip, aug.crop_padding, aug.pad_mode)
    assert variants == {"augmentation=flip": (True, True, 0, "zeros"), "augmentation='on'": (True, True, 4, "zeros"),
                        "augmentation=reflect": (True, True, 4, "reflect")}


def test_the_learning_rate_sweep_covers_its_grid(compose_cfg):
    grid = _grid(compose_cfg, "lr_stability")
    cells = {(cfg.optim.lr, cfg.run_name) for cfg, _ in grid}
    assert len(grid) == 16 and len(cells) == 16
    assert {lr for lr, _ in cells} == {1e-3, 3e-3, 1e-2, 3e-2}
    assert {name for _, name in cells} == {"none_seed0", "wd-do-bn-beta-aug_seed0", "bn_seed0", "do_seed0"}
