"""`python -m ablation.bench --tiny`: every loop is measured and written; no timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablation.bench import cli, loops
from ablation.bench.peak import add_peak_samples, gemm_peak_gflops
from ablation.model import Dropout, build_model
from ablation.runtime import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ("suite", "seed_style", "model_step", "seed_step", "eval")


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
    peak = result["peak"]
    assert peak["gflops"] > 0
    expected = {"mm", "onednn_conv1x1"} if torch.backends.mkldnn.is_available() else {"mm"}
    assert set(peak["kernels"]) == expected
    assert all(k["gflops"] == max(k["samples_gflops"]) > 0 for k in peak["kernels"].values())
    assert peak["gflops"] == max(k["gflops"] for k in peak["kernels"].values())
    assert peak["gflops"] == peak["kernels"][peak["kernel"]]["gflops"]
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
            assert loop["precision"] == "fp32" and loop["flop_limit_images_per_s"] > 0, name
        flops = width["flops"]
        for key in ("train_per_image", "forward_per_image", "peak_fp32_gflops", "flop_limit_train_images_per_s",
                    "flop_limit_eval_images_per_s"):
            assert flops[key] > 0, key
        assert flops["train_per_image"] > flops["forward_per_image"]  # backward costs about twice the forward
        for ratio in ("suite_vs_seed_style", "suite_vs_model_step", "eval_vs_train", "model_step_vs_seed_step"):
            assert width["ratios"][ratio]["value"] > 0
            assert width["ratios"][ratio]["met"] in (True, False, None)
    assert "rss" not in result and "sweep" not in result
    assert result["settings"]["precision"] == "fp32" and "peak_bf16" not in result  # auto on the CPU


def test_tiny_bench_runs_the_suites_loops_in_bf16_where_the_cpu_has_it(tmp_path):
    if not cpu_has_native_bf16():
        env = {k: v for k, v in os.environ.items() if k not in ("ABLATION_DATA", "ABLATION_RESULTS")}
        proc = subprocess.run([sys.executable, "-m", "ablation.bench", "--tiny", "--no-rss", "--device", "cpu",
                               "--precision", "bf16", "--out", str(tmp_path / "b.json")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "needs bf16 instructions" in proc.stderr
        assert not (tmp_path / "b.json").exists()
        return
    result = _run_bench(tmp_path / "bench.json", "--no-rss", "--device", "cpu", "--precision", "bf16")
    assert result["settings"]["precision"] == "bf16" and "trainer.precision=bf16" in result["settings"]["overrides"]
    assert result["peak_bf16"]["dtype"] == "bfloat16" and result["peak_bf16"]["gflops"] > 0
    for width in result["widths"].values():
        flops = width["flops"]
        for name in LOOPS:
            loop = width["loops"][name]
            expected = "fp32" if name in ("seed_style", "seed_step") else "bf16"
            assert loop["precision"] == expected, name
            peak = flops["peak_bf16_gflops" if expected == "bf16" else "peak_fp32_gflops"]
            per_image = flops["forward_per_image" if name == "eval" else "train_per_image"]
            assert loop["flop_limit_images_per_s"] == pytest.approx(peak * 1e9 / per_image), name
    md = (tmp_path / "bench.md").read_text()
    assert "Peak bf16 GEMM" in md and "| 8 | suite | bf16 |" in md and "| 8 | seed_style | fp32 |" in md


def test_gemm_peak_merges_later_samples_per_kernel():
    peak = gemm_peak_gflops(torch.device("cpu"), 64, reps=2)
    assert peak["n"] == 64 and peak["dtype"] == "float32"
    assert all(len(k["samples_gflops"]) == 2 for k in peak["kernels"].values())
    fast = {"kernels": {"mm": {"gflops": 1e9, "samples_gflops": [1.0, 1e9]}}}
    add_peak_samples(peak, fast)
    assert peak["kernel"] == "mm" and peak["gflops"] == 1e9
    assert len(peak["kernels"]["mm"]["samples_gflops"]) == 4
    assert len(peak["samples_gflops"]) == sum(len(k["samples_gflops"]) for k in peak["kernels"].values())


def test_tiny_bench_writes_the_markdown_table(tiny):
    result, out = tiny
    md = out.with_suffix(".md").read_text()
    assert f"Peak fp32 GEMM: {result['peak']['gflops']:,.1f} GFLOP/s" in md
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
    # a first run: its own empty data cache (the bench's own cache is warm), so decoding is counted
    caches = [a for a in rss["command"].split() if a.startswith("data.cache_dir=")]
    assert len(caches) == 1 and "bench-rss-" in caches[0], rss["command"]


def test_cli_defaults():
    args = cli.parse_args([])
    assert args.widths == [32, 128] and args.repeats == 3 and args.rss and not args.sweep and not args.tiny
    assert args.out == Path("results/bench/bench.json") and args.device == "auto"
    assert cli.default_images(32) == 2048 and cli.default_images(128) == 512
    tiny = cli.parse_args(["--tiny", "--no-rss"])
    assert tiny.widths == [8] and tiny.repeats == 1 and not tiny.rss
    with pytest.raises(SystemExit):
        cli.parse_args(["--repeats", "0"])


def test_override_values_are_quoted_only_when_needed():
    assert cli._override_value("/data/cifar10-jpg.tar.gz") == "/data/cifar10-jpg.tar.gz"
    assert cli._override_value("/my data/x,y") == "'/my data/x,y'"


def test_seed_model_is_the_suite_architecture_with_stock_layers():
    """The seed-style loops run the same weights; only dropout is torch's own, in the default layout."""
    cfg = cli.compose_config(["regularizer=all", "logger=none", "model.width=8"])
    torch.manual_seed(cfg.seed)
    suite = build_model(cfg, 32)
    seed = loops.seed_model(cfg, 32, 3)
    stock = [m for m in seed.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(stock) == 6 and all(type(m) is torch.nn.Dropout and m.p == 0.3 for m in stock)
    assert not any(isinstance(m, Dropout) for m in seed.modules())
    assert [type(m) for m in seed.modules() if not isinstance(m, torch.nn.Dropout)] == \
        [type(m) for m in suite.modules() if not isinstance(m, torch.nn.Dropout)]
    for (name, a), (_, b) in zip(suite.state_dict().items(), seed.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    suite.eval(), seed.eval()
    with torch.no_grad():
        assert torch.allclose(suite.encode(x)[0], seed.encode(x)[0])
