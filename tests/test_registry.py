"""The regularizer registry: everything that names regularizers follows it, a sixth one included."""
from __future__ import annotations

import dataclasses
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ablation import collect
from ablation import config as C
from ablation import regularizers as R
from ablation import stats
from conftest import ROOT

# A toy sixth regularizer, as a user would add it: its YAML group, its registry entry, and (here
# nowhere) the code where it acts. The same lines run in the training subprocess below.
TOY_ENTRY = '''
import dataclasses
from ablation import config, regularizers

@dataclasses.dataclass
class InputNoiseConfig:
    enabled: bool = False
    sigma: float = 0.1

regularizers.register(regularizers.Regularizer("input_noise", "noise", "input noise", "data", InputNoiseConfig,
                                               {"sigma": 0.0}))
config.register()
'''


def add_toy_group(conf: Path) -> Path:
    """A copy of conf/ with the toy group: its on/off files, its defaults entry and its factorial line."""
    shutil.copytree(C.CONF_DIR, conf)
    (conf / "input_noise").mkdir()
    (conf / "input_noise" / "on.yaml").write_text("enabled: true\n")
    (conf / "input_noise" / "off.yaml").write_text("enabled: false\n")
    primary = conf / "config.yaml"
    primary.write_text(primary.read_text().replace("  - regularizer: null", "  - input_noise: 'off'\n  - regularizer: null"))
    sweep = conf / "sweep" / "factorial.yaml"
    sweep.write_text(sweep.read_text() + "      input_noise: \"'on','off'\"\n")
    return conf


@pytest.fixture
def toy(tmp_path):
    """The toy regularizer registered in this process, and its config directory; both undone afterwards."""
    saved = dict(R.REGISTRY)
    exec(TOY_ENTRY, {})
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(add_toy_group(tmp_path / "conf")), version_base="1.3"):
            yield lambda *overrides, **kw: compose("config", overrides=list(overrides), **kw)
    finally:
        GlobalHydra.instance().clear()
        R.REGISTRY.clear()
        R.REGISTRY.update(saved)
        C.register()


def test_the_five_regularizers_of_the_seed_report():
    assert R.names() == ("weight_decay", "dropout", "batchnorm", "beta", "augmentation")
    assert R.tags() == ("wd", "do", "bn", "beta", "aug")
    for reg in R.REGISTRY.values():  # on.yaml / off.yaml hold the switch alone: values live in the schema
        for option, enabled in (("on", True), ("off", False)):
            assert OmegaConf.load(C.CONF_DIR / reg.group / f"{option}.yaml") == {"enabled": enabled}


def test_run_names_round_trip():
    for flags in itertools.product([False, True], repeat=len(R.names())):
        on = dict(zip(R.names(), flags))
        name = R.run_name(on, 7)
        assert R.parse_run_name(name) == {"seed": 7, **on}
    assert R.run_name({}, 0) == "none_seed0"
    for bad in ("none", "wd-xx_seed0", "wd-wd_seed0", "wd_seedX", "_seed0"):
        assert R.parse_run_name(bad) == {}, bad


def test_an_off_group_uses_its_off_values_whatever_it_says(compose_cfg):
    cfg = compose_cfg("budget=smoke", "beta=off", "beta.value=2", "dropout=off", "dropout.p=0.5")
    reg = R.effective(cfg)
    assert (reg.beta.value, reg.dropout.p) == (1.0, 0.0)
    assert C.config_hash(cfg) == C.config_hash(compose_cfg("budget=smoke")), "an off group's values change nothing"
    on = R.effective(compose_cfg("beta=on", "beta.value=2", "dropout=on"))
    assert (on.beta.value, on.dropout.p) == (2.0, 0.3)


def test_registering_checks_the_entry():
    with pytest.raises(ValueError, match="unique"):
        R.register(R.Regularizer("dropout2", "do", "x", "model", R.DropoutConfig, {}))
    with pytest.raises(ValueError, match="acts_on"):
        R.register(R.Regularizer("x", "x", "x", "loss", R.DropoutConfig, {}))
    assert "dropout2" not in R.REGISTRY and "x" not in R.REGISTRY


def test_a_sixth_regularizer_composes_and_names_its_runs(toy):
    assert R.names()[-1] == "input_noise"
    cfg = toy("input_noise=on", "dropout=on")
    assert cfg.run_name == "do-noise_seed0" and R.flags(cfg)["input_noise"] is True
    assert dataclasses.asdict(R.effective(toy("input_noise.sigma=0.5")).input_noise) == {"enabled": False, "sigma": 0.0}
    assert R.effective(toy("input_noise=on")).input_noise.sigma == 0.1
    assert toy("regularizer=none").run_name == "none_seed0"
    with pytest.raises(Exception, match="input_noise.sgima"):
        toy("input_noise.sgima=1")  # the schema types the new group too
    # the factorial sweep now has 2^6 points, each composing to its own run name
    params = toy("+sweep=factorial", return_hydra_config=True).hydra.sweeper.params
    assert set(params) == set(R.names())
    names = {toy(*(f"{g}={v}" for g, v in zip(params, point))).run_name
             for point in itertools.product(["on", "off"], repeat=len(params))}
    assert len(names) == 64 and "wd-do-bn-beta-aug-noise_seed0" in names


SWEEP = TOY_ENTRY + '''
import sys
from ablation.train import main
sys.argv = ["ablation.train", "--config-path", sys.argv[1], "-m", "input_noise=on,off", "dropout=on,off",
            "budget=smoke", "logger=none", "trainer.epochs=1", "study=toy"]
main()
'''


def test_a_sweep_over_a_sixth_regularizer_trains_and_is_collected(env, tmp_path, toy):
    conf = tmp_path / "conf"
    proc = subprocess.run([sys.executable, "-c", SWEEP, str(conf)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = Path(env["ABLATION_RESULTS"]) / "toy"
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == [
        "do-noise_seed0", "do_seed0", "noise_seed0", "none_seed0"]
    runs, _ = collect.collect_study(study)
    assert runs["included"].all(), runs["excluded_reason"].tolist()
    by_name = runs.set_index("run_name")
    assert by_name.loc["do-noise_seed0", "input_noise"] and not by_name.loc["do_seed0", "input_noise"]
    assert by_name.loc["noise_seed0", "combo"] == "noise"
    effects = stats.main_effects(runs, metrics=("test_recon",))
    assert set(effects["term"]) == {"dropout", "input_noise"}
