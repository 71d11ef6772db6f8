"""trainer.reuse_memory: freed tensors stay in the process instead of being unmapped and faulted back in.

Each check runs in a fresh interpreter: the malloc thresholds belong to the whole process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ablation import allocator
from ablation import config as C

ROOT = Path(__file__).resolve().parent.parent
GLIBC = allocator.is_glibc()

# Cycles like a training step: three large tensors (two of them above glibc's largest dynamic
# mmap threshold, 32 MiB) allocated, written and freed together. Per cycle: the page faults
# and the resident memory after the free, before and after the allocator setting.
PROBE = textwrap.dedent("""
    import json, os, resource
    import torch
    from ablation import allocator

    MIB = 1 << 20
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB

    def cycle():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.empty(n * MIB // 4).fill_(1.0) for n in (48, 48, 16)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        del xs
        return {"faults": faults, "rss_mib": rss()}

    before = [cycle() for _ in range(4)]
    applied = allocator.reuse_freed_memory()
    again = allocator.reuse_freed_memory()
    after = [cycle() for _ in range(12)]
    print(json.dumps({"before": before, "after": after, "applied": applied, "again": again,
                      "reported": allocator.applied()}))
""")


def _python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_kept_and_reused():
    r = _python(PROBE)
    if not GLIBC:
        assert r["applied"] is None and r["reported"] is None, "only glibc's allocator is touched"
        return
    assert r["applied"] == r["again"] == r["reported"]
    assert r["applied"]["trim_threshold"] == 1 << 30 and r["applied"]["mmap_threshold"] >= 32 << 20
    pages = 112 * (1 << 20) // 4096
    # C library defaults: the 48 MiB blocks are mmap'd and unmapped again, so every cycle faults them in
    assert all(c["faults"] > 0.8 * 96 * (1 << 20) / 4096 for c in r["before"][1:]), r["before"]
    # reuse: once the heap has settled (a few cycles: a freed block can be an alignment pad short of
    # the next request) the freed memory is used again, without faults and without growing
    steady = r["after"][-4:]
    assert all(c["faults"] < 0.01 * pages for c in steady), r["after"]
    assert max(c["rss_mib"] for c in steady) - min(c["rss_mib"] for c in steady) < 1, r["after"]
    kept = steady[0]["rss_mib"] - r["before"][-1]["rss_mib"]
    assert 96 < kept < 3 * 112, f"the freed memory stays resident, within a bound ({kept:.0f} MiB)"


def _prepared(*overrides: str) -> dict | None:
    code = textwrap.dedent(f"""
        import json
        from ablation import allocator, bench
        from ablation.train import prepare
        prepare(bench.compose_config({list(overrides)!r}))
        print(json.dumps({{"applied": allocator.applied()}}))
    """)
    return _python(code)["applied"]


def test_prepare_applies_the_setting_unless_switched_off():
    on = _prepared("budget=smoke")
    assert (on is not None) == GLIBC
    assert _prepared("budget=smoke", "trainer.reuse_memory=false") is None


def test_reuse_memory_does_not_change_the_config_hash(compose_cfg):
    on, off = compose_cfg("budget=smoke"), compose_cfg("budget=smoke", "trainer.reuse_memory=false")
    assert on.trainer.reuse_memory is True and off.trainer.reuse_memory is False
    assert C.config_hash(on) == C.config_hash(off) and C.settings_hash(on) == C.settings_hash(off)
    assert C.config_hash(on) != C.config_hash(compose_cfg("budget=smoke", "trainer.batch_size=64"))
