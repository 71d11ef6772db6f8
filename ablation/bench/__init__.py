"""Throughput bench: the suite's training loop against a seed-style loop, the bare model step and evaluation.

    make bench                                           # widths 32 and 128, 3 repeats, into results/bench/
    make bench ARGS=--sweep                              # also runs/hour of the smoke factorial (slow)
    make bench ARGS="--precision bf16 --out results/bench/bf16/bench.json"   # the suite's loops in bf16
    make bench ARGS="--device cuda --out results/bench/cuda/bench.json"      # on a GPU
    make bench ARGS="--data-root /path/cifar10-jpg.tar.gz --widths 32 --repeats 5"
    python -m ablation.bench --tiny --no-rss             # generated data, width 8: a quick self-check

`make bench` runs `python -m ablation.bench $(ARGS)`; the `ablation-bench` script is the same.
In one process, for each width, five loops are timed in alternating rounds
(suite, seed_style, model_step, seed_step, eval, suite, ...), after one warm-up round, and
the medians are reported:

suite        `Trainer.train_epoch()` of ablation.trainer, the loop `ablation.train` runs, built by
             `build_trainer` from a config composed with Hydra (`regularizer=all logger=none`) on a fixed
             number of real images; end to end: batch gathering and augmentation of the in-memory
             uint8 tensor included.
seed_style   the seed's loop on the same images, architecture, initial weights, width and regularizers,
             written as the seed wrote it: torchvision ImageFolder (or CIFAR10) with PIL transforms in a
             DataLoader (batch 128, 2 persistent workers), the seed's model (`seed_model`: torch's stock
             nn.Dropout, default memory format), Adam with weight decay 1e-4, `vae_loss` with beta 4 and
             `loss.item()` every step.
model_step   the suite's model and optimizer (channels_last, `ablation.model.Dropout`, fused Adam): forward,
             loss, backward and Adam step on one fixed in-memory float batch: the ceiling for any data pipeline.
seed_step    the same step with the seed's model, layout and optimizer (torch's default Adam):
             model_step / seed_step is the part of the suite's gain that comes from the model code,
             suite / model_step the part from the data path.
eval         `ablation.evaluate.evaluate` on the test images (inference mode, eval batch from the config).

The suite's loops run at `trainer.precision` (`--precision`, default auto: fp32 on the CPU), the
seed's always in fp32. It also counts the model's FLOPs per image (torch.utils.flop_counter),
measures the machine's fp32 GEMM peak (the best of torch.mm and, on the CPU, a oneDNN 1x1
convolution; with bf16 also the bf16 peak, the limit of the suite's loops), derives each loop's
fraction of the FLOP-limit images/s, and measures the peak RSS of a `budget=cpu` training run in a
subprocess. Results go to results/bench/bench.json (`--out`) and a Markdown table beside it
(bench.md). Targets are reported with "target met", never asserted.

The modules, one job each:

loops.py     the timed loops of one width (`WidthBench`, `bench_width`), the seed's model and dataset
peak.py      the GEMM peak and the FLOP limits derived from it
measure.py   child-process measurements (peak RSS, sweep throughput) and the machine's description
render.py    bench.md from bench.json's content
cli.py       arguments, the composed configs, `run` and `main` (`__main__.py` calls it)
"""
