"""`python -m ablation.bench --tiny`: every loop is measured and written; no timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablation import bench

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ("suite", "seed_style", "model_step", "eval")


def _run_bench(out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ABLATION_DATA", "ABLATION_RESULTS")}
    proc = subprocess.run([sys.executable, "-m", "ablation.bench", "--tiny", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    return _run_bench(out, "--no-rss"), out


def test_tiny_bench_measures_every_loop(tiny):
    result, out = tiny
    assert result["settings"]["tiny"] is True
    assert list(result["widths"]) == ["8"]
    assert result["peak"]["gflops"] > 0
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["threads"] >= 1 and machine["torch"] and machine["cpu"]
    for width in result["widths"].values():
        assert width["images"] > 0 and width["eval_images"] > 0
        assert width["seed_style_same_images"] is True
        for name in LOOPS:
            loop = width["loops"][name]
            assert loop["images_per_s"] > 0, name
            assert loop["images"] > 0 and all(s > 0 for s in loop["seconds"]), name
            assert len(loop["samples_images_per_s"]) == result["settings"]["repeats"]
            assert loop["fraction_of_flop_limit"] > 0, name
        flops = width["flops"]
        for key in ("train_per_image", "forward_per_image", "peak_fp32_gflops", "flop_limit_train_images_per_s",
                    "flop_limit_eval_images_per_s"):
            assert flops[key] > 0, key
        assert flops["train_per_image"] > flops["forward_per_image"]  # backward costs about twice the forward
        for ratio in ("suite_vs_seed_style", "suite_vs_model_step", "eval_vs_train"):
            assert width["ratios"][ratio]["value"] > 0
            assert width["ratios"][ratio]["met"] in (True, False, None)
    assert "rss" not in result and "sweep" not in result


def test_tiny_bench_writes_the_markdown_table(tiny):
    _, out = tiny
    md = out.with_suffix(".md").read_text()
    assert "| width | loop |" in md and "target met" in md
    for name in LOOPS:
        assert f"| {name} |" in md


def test_tiny_bench_measures_peak_rss(tmp_path):
    result = _run_bench(tmp_path / "bench.json", "--warmup", "0")
    rss = result["rss"]
    assert rss["returncode"] == 0, rss.get("error")
    assert rss["budget"] == "smoke"
    assert rss["peak_rss_kib"] > 0 and rss["peak_rss_gib"] > 0
    assert "peak RSS" in (tmp_path / "bench.md").read_text()


def test_cli_defaults():
    args = bench.parse_args([])
    assert args.widths == [32, 128] and args.repeats == 3 and args.rss and not args.sweep and not args.tiny
    assert args.out == Path("results/bench/bench.json") and args.device == "auto"
    assert bench.default_images(32) == 2048 and bench.default_images(128) == 512
    tiny = bench.parse_args(["--tiny", "--no-rss"])
    assert tiny.widths == [8] and tiny.repeats == 1 and not tiny.rss
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])


def test_override_values_are_quoted_only_when_needed():
    assert bench._override_value("/data/cifar10-jpg.tar.gz") == "/data/cifar10-jpg.tar.gz"
    assert bench._override_value("/my data/x,y") == "'/my data/x,y'"
