"""Data integrity: corrupt archives, short classes, corrupt caches and missing roots are refused or rebuilt,
and the data's identity reaches metrics.json and decides which runs may pool.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_data_integrity.py -q
    PYTHONPATH=$PWD .venv/bin/python -m pytest -m faults -q        # the corruption cases alone (fault suite)

Every corrupt archive is built from a small generated ImageFolder (ablation/synthetic.py). ARCHIVE_FAULTS
lists them, each with the words its one-line refusal must hold, so the fault suite can reuse them.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from ablation.collect import collect_study
from ablation.data import CIFAR10_CLASSES, COUNTS_FILE, DIGEST_FIELD, DataError, content_digest, load_images
from ablation.synthetic import make_imagefolder
from conftest import ROOT, train

N_TRAIN, N_TEST, N_CLASSES = 32, 16, 4


def _same_owner_and_time(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def tar_bytes(folder: Path, arcname: str = "fake") -> bytes:
    """An uncompressed tar of `folder`, as `tar -C parent -cf - arcname` writes it; the same bytes on every
    run (no file times or owners), so each corruption hits the same place."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=arcname, filter=_same_owner_and_time)
    return buf.getvalue()


def _member_offset(raw: bytes, fraction: float) -> int:
    """The header offset of the file member nearest `fraction` of the way through tar `raw`."""
    files = [m for m in tarfile.open(fileobj=io.BytesIO(raw)).getmembers() if m.isfile()]
    return files[int(len(files) * fraction)].offset


def truncated(folder: Path) -> bytes:
    """The first 60% of the .tar.gz, as an interrupted download leaves it."""
    gz = gzip.compress(tar_bytes(folder), mtime=0)
    return gz[: len(gz) * 6 // 10]


def bit_flipped(folder: Path) -> bytes:
    """One byte of the deflate payload flipped halfway through: inflates to garbage or fails."""
    gz = bytearray(gzip.compress(tar_bytes(folder), mtime=0))
    gz[len(gz) // 2] ^= 0x55
    return bytes(gz)


def bad_header(folder: Path) -> bytes:
    """A valid gzip of a tar whose member header 95% of the way through has a wrong checksum: tarfile
    stops there without an error, so without the check the images before it would pass for all of them."""
    raw = bytearray(tar_bytes(folder))
    raw[_member_offset(bytes(raw), 0.95) + 148] ^= 0x11  # the checksum field of a header near the end
    return gzip.compress(bytes(raw), mtime=0)


def no_end_blocks(folder: Path) -> bytes:
    """A plain .tar cut at a member boundary: every header read is valid, the rest of the archive is gone."""
    raw = tar_bytes(folder)
    return raw[: _member_offset(raw, 0.95)]


def class_short(folder: Path) -> bytes:
    """A .tar.gz whose counts.json lists every image, with one train image of class_3 missing."""
    counts = {split: {f"class_{k}": n // N_CLASSES for k in range(N_CLASSES)}
              for split, n in (("train", N_TRAIN), ("test", N_TEST))}
    (folder / COUNTS_FILE).write_text(json.dumps(counts))
    (folder / "train" / "class_3" / "0003.png").unlink()
    return gzip.compress(tar_bytes(folder), mtime=0)


@dataclass(frozen=True)
class ArchiveFault:
    name: str
    suffix: str
    make: Callable[[Path], bytes]  # the archive's bytes, from a fresh generated ImageFolder it may change
    says: tuple[str, ...]  # what the one-line refusal holds besides the archive's path


ARCHIVE_FAULTS = (
    ArchiveFault("truncated", ".tar.gz", truncated, ("cannot be read whole", "EOFError", "Re-download")),
    ArchiveFault("bit-flipped-gzip", ".tar.gz", bit_flipped, ("cannot be read whole", "corrupt", "Re-download")),
    ArchiveFault("bad-tar-header", ".tar.gz", bad_header, ("tar header at byte", "is damaged", "were not read")),
    ArchiveFault("no-end-blocks", ".tar", no_end_blocks, ("is truncated", "end-of-archive blocks")),
    ArchiveFault("class-short", ".tar.gz", class_short,
                 ("is incomplete", "class 'class_3' has 7 train images where counts.json says 8")),
)


def build_archive(fault: ArchiveFault, where: Path) -> Path:
    """The corrupt archive of `fault`, written under `where` (a fresh directory)."""
    folder = make_imagefolder(where / "src" / "fake", n_train=N_TRAIN, n_test=N_TEST, n_classes=N_CLASSES)
    archive = where / f"{fault.name}{fault.suffix}"
    archive.write_bytes(fault.make(folder))
    return archive


def one_line_error(stderr: str) -> str:
    """The `error: ...` line the CLI printed; the output holds no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def completed_runs(results: Path) -> list[Path]:
    return [p for p in results.rglob("metrics.json") if json.loads(p.read_text()).get("status") == "completed"]


@pytest.mark.faults
@pytest.mark.parametrize("fault", ARCHIVE_FAULTS, ids=[f.name for f in ARCHIVE_FAULTS])
def test_corrupt_archive_is_refused_in_one_line_and_not_cached(fault, tmp_path):
    archive = build_archive(fault, tmp_path)
    with pytest.raises(DataError) as info:
        load_images(archive, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg and str(archive) in msg
    assert all(words in msg for words in fault.says), msg
    assert not list((tmp_path / "cache").glob("*.pt")), "nothing of a refused archive is cached"


@pytest.mark.faults
@pytest.mark.parametrize("fault", ARCHIVE_FAULTS, ids=[f.name for f in ARCHIVE_FAULTS])
def test_corrupt_archive_stops_training_with_exit_2(fault, env, tmp_path):
    archive = build_archive(fault, tmp_path)
    proc = train(f"data.root={archive}", "data.train_size=16", "data.test_size=8", env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert str(archive) in line and all(words in line for words in fault.says), line
    assert not completed_runs(Path(env["ABLATION_RESULTS"])), "no run completes on a corrupt archive"
    assert not list(Path(env["ABLATION_CACHE"]).rglob("*.pt")), "nothing of a refused archive is cached"


@pytest.mark.faults
def test_short_cifar10_class_is_refused_without_a_manifest(tmp_path):
    # Class folders named as CIFAR-10's: the layout states 5,000 train and 1,000 test images per class.
    folder = make_imagefolder(tmp_path / "cifar10-jpg", n_train=20, n_test=10, n_classes=10)
    for split in ("train", "test"):
        for k, name in enumerate(CIFAR10_CLASSES):
            (folder / split / f"class_{k}").rename(folder / split / name)
    archive = tmp_path / "cifar10-jpg.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes(folder, "cifar10-jpg"), mtime=0))
    with pytest.raises(DataError) as info:
        load_images(archive, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg and str(archive) in msg
    assert "class 'airplane' has 2 train images where CIFAR-10 says 5,000 (and 19 more differences)" in msg


def test_matching_counts_manifest_loads(tmp_path):
    folder = make_imagefolder(tmp_path / "fake", n_train=N_TRAIN, n_test=N_TEST, n_classes=N_CLASSES)
    counts = {split: {f"class_{k}": n // N_CLASSES for k in range(N_CLASSES)}
              for split, n in (("train", N_TRAIN), ("test", N_TEST))}
    (folder / COUNTS_FILE).write_text(json.dumps(counts))
    archive = tmp_path / "fake.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes(folder), mtime=0))
    for root in (folder, archive):
        data = load_images(root, cache_dir=tmp_path / "cache")
        assert torch.bincount(data.train_y).tolist() == [8] * 4 and torch.bincount(data.test_y).tolist() == [4] * 4
    (folder / COUNTS_FILE).write_text("{\"train\": 3}")
    with pytest.raises(DataError, match="is not a counts manifest"):
        load_images(folder, cache_dir=tmp_path / "cache")


def _cache_file(cache: Path) -> Path:
    (path,) = cache.glob("*.pt")
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _alter_pixels(path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["train_x"][0] = 255 - blob["train_x"][0]  # a readable file whose images are not the source's
    torch.save(blob, path)


def _drop_images(path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["train_x"], blob["train_y"] = blob["train_x"][:-1], blob["train_y"][:-1]
    torch.save(blob, path)


@pytest.mark.faults
@pytest.mark.parametrize("damage", [_truncate, _alter_pixels, _drop_images], ids=["truncated", "altered", "short"])
@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_corrupt_cache_is_decoded_again(damage, packed, tmp_path, caplog):
    root = make_imagefolder(tmp_path / "fake", n_train=N_TRAIN, n_test=N_TEST, n_classes=N_CLASSES)
    if packed:
        root = tmp_path / "fake.tar.gz"
        root.write_bytes(gzip.compress(tar_bytes(tmp_path / "fake"), mtime=0))
    cache = tmp_path / "cache"
    first = load_images(root, cache_dir=cache)
    damage(_cache_file(cache))
    with caplog.at_level(logging.WARNING, logger="ablation.data"):
        again = load_images(root, cache_dir=cache)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in warning and str(_cache_file(cache)) in warning and "decoding again" in warning
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.train_y, first.train_y)
    assert again.identity == first.identity and again.identity.train_images == N_TRAIN
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ablation.data"):
        third = load_images(root, cache_dir=cache)  # the rewritten cache is whole again
    assert not caplog.records and torch.equal(third.train_x, first.train_x)


@pytest.mark.faults
def test_missing_root_is_not_created_and_named(env, tmp_path):
    root = tmp_path / "data" / "cifar10"
    (tmp_path / "data").mkdir()
    proc = train(f"data.root={root}", "data.download=false", env=env, check=False)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert f"data.root '{root}' does not exist" in line and "point data.root (or ABLATION_DATA) at" in line
    assert not root.exists() and not list((tmp_path / "data").iterdir()), "nothing is created for a missing root"
    assert not completed_runs(Path(env["ABLATION_RESULTS"]))


@pytest.mark.faults
def test_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    # A real torchvision download against a closed local port fails; the next run must see the same problem.
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = tmp_path / "cifar"
    for _ in range(2):
        with pytest.raises(DataError) as info:
            load_images(root, download=True)
        msg = str(info.value)
        assert "\n" not in msg and f"data.root '{root}' does not exist" in msg and "nothing was created" in msg
        assert not list(tmp_path.iterdir()), "neither the root nor a partial download is left"


def test_archive_and_its_folder_share_one_identity(image_folder, tmp_path):
    archive = tmp_path / "fake.tar.gz"
    archive.write_bytes(gzip.compress(tar_bytes(image_folder), mtime=0))
    folder = load_images(image_folder, cache_dir=None).identity
    packed = load_images(archive, cache_dir=tmp_path / "cache").identity
    assert folder == packed and (folder.train_images, folder.test_images, folder.classes) == (256, 128, 4)
    other = make_imagefolder(tmp_path / "other", n_train=256, n_test=128, seed=1)
    assert load_images(other, cache_dir=None).identity.digest != folder.digest
    assert folder.digest == content_digest(load_images(image_folder, cache_dir=None)), "one digest of a dataset"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, image_folder) -> Path:
    """One real smoke training run on the generated ImageFolder; its run directory."""
    import os
    tmp = tmp_path_factory.mktemp("identity")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp / "results"),
               ABLATION_CACHE=str(tmp / "cache"), WANDB_MODE="disabled")
    train("regularizer=none", env=env)
    return tmp / "results" / "main" / "none_seed0"


def test_metrics_json_records_the_data_identity(smoke_run, image_folder):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    identity = load_images(image_folder, cache_dir=None).identity
    assert metrics["status"] == "completed"
    assert {k: metrics[k] for k in identity.fields()} == identity.fields()
    assert metrics["data_train_images"] == 256 and metrics["data_test_images"] == 128  # the source, not the subset


def test_runs_on_different_data_never_pool(smoke_run, tmp_path):
    """Copies of one real run: same data pools, different data does not, and runs that recorded no
    identity (made before it was recorded) pool with each other exactly as before."""
    study = tmp_path / "study"

    def copy(name: str, change: Callable[[dict], None]) -> None:
        shutil.copytree(smoke_run, study / name)
        path = study / name / "metrics.json"
        metrics = json.loads(path.read_text())
        change(metrics)
        path.write_text(json.dumps(metrics))

    copy("none_seed0", lambda m: None)
    copy("none_seed1", lambda m: m.update(seed=1))
    copy("none_seed2", lambda m: m.update(seed=2, **{DIGEST_FIELD: "0" * 64}))
    copy("none_seed3", lambda m: [m.update(seed=3), m.pop(DIGEST_FIELD)])
    copy("none_seed4", lambda m: [m.update(seed=4), m.pop(DIGEST_FIELD)])
    runs, _ = collect_study(study)
    group = dict(zip(runs["run_name"], runs["settings_hash"]))
    recorded = json.loads((smoke_run / "metrics.json").read_text())["settings_hash"]
    assert group["none_seed0"] == group["none_seed1"], "the same data pools"
    assert group["none_seed2"] != group["none_seed0"], "different data never pools"
    assert group["none_seed3"] == group["none_seed4"] == recorded, "runs without an identity keep their group"
    assert len({group["none_seed0"][:8], group["none_seed2"][:8], recorded[:8]}) == 3, "distinct short keys"
    assert runs["included"].all()


def test_resuming_on_changed_data_is_refused(env, tmp_path):
    """A run interrupted after its first checkpoint is not resumed on other data at the same data.root: one
    line names both digests and the fix, exit 2, and the run stays resumable on its own data."""
    root = make_imagefolder(tmp_path / "swapped", n_train=256, n_test=128, seed=0)
    env = env | {"ABLATION_DATA": str(root)}
    run_dir = Path(env["ABLATION_RESULTS"]) / "swap" / "none_seed0"
    args = [sys.executable, "-m", "ablation.train", "budget=smoke", "logger=none", "study=swap", "trainer.threads=1",
            "trainer.epochs=4", "data.train_size=512", "model.width=16", "trainer.checkpoint_every_s=0"]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started_on = json.loads((run_dir / "metrics.json").read_text())[DIGEST_FIELD]
    shutil.rmtree(root)
    make_imagefolder(root, n_train=256, n_test=128, seed=1)
    refused = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if "started training on data" in line]
    assert len(errors) == 1 and started_on[:12] in errors[0] and "overwrite=true" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert (run_dir / "checkpoint.pt").exists(), "the run stays resumable on its own data"
