"""bench.md: the Markdown tables of a bench result (the content of bench.json)."""
from __future__ import annotations

from .loops import LOOPS
from .measure import TARGET_RSS_GIB


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "no")


def _peak_line(peak: dict, precision: str = "fp32") -> str:
    names = {"mm": "torch.mm", "onednn_conv1x1": "oneDNN 1x1 convolution"}
    n, best = peak["n"], peak["kernel"]
    others = "; ".join(f"{names.get(k, k)} {_fmt(v['gflops'], 1)}" for k, v in peak["kernels"].items() if k != best)
    return (f"Peak {precision} GEMM: {_fmt(peak['gflops'], 1)} GFLOP/s ({names.get(best, best)}, {n}x{n}x{n}, best of "
            f"{len(peak['kernels'][best]['samples_gflops'])} spread over the run{'; ' + others if others else ''}).")


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Throughput bench",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, device "
        f"{m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}.",
        f"Data: `{s['data_root']}`{' (tiny, generated)' if s['tiny'] else ''}. Medians of {s['repeats']} "
        f"alternating repeats after {s['warmup']} warm-up round(s). Precision: the suite's loops "
        f"{s.get('precision', 'fp32')} (`trainer.precision`), the seed's fp32.",
        _peak_line(result["peak"]),
        *([_peak_line(result["peak_bf16"], "bf16")] if result.get("peak_bf16") else []),
        "",
        "| width | loop | precision | images | images/s (median) | samples | FLOPs/image | FLOP-limit images/s "
        "| % of limit |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for key, w in result["widths"].items():
        fl = w["flops"]
        for name in LOOPS:
            loop = w["loops"][name]
            per = fl["forward_per_image"] if name == "eval" else fl["train_per_image"]
            samples = ", ".join(f"{r:,.0f}" for r in loop["samples_images_per_s"])
            lines.append(f"| {key} | {name} | {loop['precision']} | {loop['images']} | "
                         f"{_fmt(loop['images_per_s'], 1)} | {samples} | {per / 1e6:,.1f} M | "
                         f"{_fmt(loop['flop_limit_images_per_s'], 0)} | {100 * loop['fraction_of_flop_limit']:.1f}% |")
    lines += ["", "| check | width | value | target | target met |", "|---|---:|---:|---:|---|"]
    names = {"suite_vs_seed_style": "suite / seed-style images/s", "suite_vs_model_step": "suite / model step images/s",
             "eval_vs_train": "eval / train (suite) images/s",
             "model_step_vs_seed_step": "model step / seed step images/s (model code)"}
    for key, w in result["widths"].items():
        for rname, label in names.items():
            r = w["ratios"][rname]
            target = "n/a" if r["target"] is None else f">= {r['target']:g}x"
            lines.append(f"| {label} | {key} | {r['value']:.2f}x | {target} | {_met(r['met'])} |")
    rss = result.get("rss")
    if rss:
        value = f"{rss['peak_rss_gib']:.2f} GiB" if rss["returncode"] == 0 else f"failed (exit {rss['returncode']})"
        lines.append(f"| peak RSS, budget={rss['budget']} run (1 epoch, cold data cache) | - | {value} | "
                     f"<= {TARGET_RSS_GIB:g} GiB | "
                     f"{_met(rss['met'])} |")
    sweep = result.get("sweep")
    if sweep:
        lines += ["", f"Sweep throughput: `+sweep=factorial budget={sweep['budget']}` with the joblib launcher.", "",
                  "| jobs | threads/job | runs completed | wall s | runs/hour |", "|---:|---:|---:|---:|---:|"]
        for row in sweep["configs"]:
            lines.append(f"| {row['jobs']} | {row['threads']} | {row['completed']}/{row['runs']} | "
                         f"{row['wall_s']:.0f} | {row['runs_per_hour']:.0f} |")
    return "\n".join(lines) + "\n"
