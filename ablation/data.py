"""Data: CIFAR-10 (or any ImageFolder) decoded once to uint8 tensors, batched and augmented on the device.

`data.root` accepts three layouts, detected by what is there:

1. a torchvision CIFAR-10 directory (holding `cifar-10-batches-py/`), downloaded by
   torchvision when absent and `data.download=true` (into a temporary folder renamed to
   `data.root` only once complete: a failed download leaves no folder behind);
2. an ImageFolder directory with `train/<class>/*` and `test/<class>/*`;
3. a `.tar.gz` (or `.tgz`, `.tar`) of either, read without unpacking.

A directory whose only sub-folder holds (1) or (2), as unpacking an archive leaves it, is
used through that sub-folder. CIFAR-10 is read straight from its python batches.

Nothing is trained on data that is not all there. An archive is read as one stream to its
end: the gzip CRC and length are checked, every tar member is read to its end, and what
follows the last member must be the end-of-archive zero blocks (tarfile stops silently at a
damaged header). The class and image counts are checked when the layout states them: a
`counts.json` beside train/ and test/ ({"train": {class: images}, "test": {...}}), or, for
data whose classes are CIFAR-10's ten, 5,000 train and 1,000 test images per class. Any
shortfall or corruption is a DataError naming the data and the problem.

Decoded archives and ImageFolders are cached as one uint8 tensor file under
`data.cache_dir`, keyed by a digest of the source: an archive's sha256 (one streaming pass;
the decoding pass hashes it again and must agree), or for an ImageFolder the relative path,
size and modification time (ns) of every image file and of counts.json (one stat per file;
contents are not read), with the image count. The cache file stores the sha256 of its
tensors, checked on every load: an unreadable, truncated or altered cache is decoded again,
never trusted. That tensor digest and the image counts are the data's identity
(`DataIdentity`), recorded in each run's metrics.json so that runs on different data are
never pooled. The images are held in memory (on the GPU when training there). Training
batches are gathered from that tensor, augmented with tensor ops on the device (no PIL, no
DataLoader workers), and scaled to [-1, 1] for the Tanh output.

    python -m ablation.train data.root=/data/cifar10-jpg.tar.gz budget=smoke   # verified, then cached
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .config import ConfigError
from .runio import atomic_torch_save

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
LAYOUTS = (
    "data.root accepts: (1) a torchvision CIFAR-10 directory holding cifar-10-batches-py/; "
    "(2) an ImageFolder directory with train/<class>/ and test/<class>/ image folders; "
    "(3) a .tar.gz of either. Set it with data.root=PATH or the ABLATION_DATA environment variable."
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_PER_CLASS = {"train": 5000, "test": 1000}
COUNTS_FILE = "counts.json"  # optional, beside train/ and test/: {"train": {class: images}, "test": {...}}
CHUNK = 1 << 20
TAR_END = 512  # a tar archive ends with zero blocks of this size
DIGEST_FIELD = "data_digest"  # the metrics.json field of the data's identity that decides pooling


class DataError(ConfigError):
    """The data root is missing or malformed; the message names the path and the fix."""


@dataclass(frozen=True)
class DataIdentity:
    """What a run trained on: the sha256 of the decoded source (`content_digest`) and its counts,
    before any subset is taken. Runs whose identities differ are never pooled (ablation/collect.py)."""

    digest: str
    train_images: int
    test_images: int
    classes: int

    def fields(self) -> dict:
        """The metrics.json fields; DIGEST_FIELD is the one that decides pooling."""
        return {DIGEST_FIELD: self.digest, "data_train_images": self.train_images,
                "data_test_images": self.test_images, "data_classes": self.classes}


@dataclass
class ImageData:
    """Both splits as uint8 tensors [N, C, H, W] with int64 labels, and the identity of the source
    they were drawn from (kept through `subset`, `split_validation` and `to`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    identity: DataIdentity | None = None

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    def to(self, device: torch.device) -> "ImageData":
        return ImageData(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                         self.test_y.to(device), self.classes, self.identity)


def stratified_indices(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """A deterministic class-stratified subset of `size` indices (all indices when size is None).

    Each class gets size // n_classes images, the first size % n_classes classes one more;
    which images is fixed by `seed`. Indices are returned sorted.
    """
    n = labels.numel()
    if size is None or size >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    classes = torch.unique(labels)
    per, extra = divmod(size, len(classes))
    chosen = []
    for k, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()
        take = min(per + (1 if k < extra else 0), idx.numel())
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:take]])
    return torch.sort(torch.cat(chosen)).values


def subset(data: ImageData, train_size: int | None, test_size: int | None, seed: int) -> ImageData:
    tr = stratified_indices(data.train_y, train_size, seed)
    te = stratified_indices(data.test_y, test_size, seed + 1)
    return ImageData(data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te], data.classes,
                     data.identity)


def split_validation(data: ImageData, val_size: int | None,
                     seed: int) -> tuple[ImageData, torch.Tensor | None, torch.Tensor | None]:
    """(data without the validation images, val_x, val_y): `val_size` class-stratified training images
    (`stratified_indices` with `seed`) taken out of the training set, in their original order.

    With val_size None, `data` itself and no validation images: training is left as it was.
    """
    if val_size is None:
        return data, None, None
    n = data.train_y.numel()
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} would leave none of the {n} training images to train on; "
                        f"use fewer validation images, or data.val_size=null for no validation split.")
    val = stratified_indices(data.train_y, val_size, seed)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    train = torch.nonzero(keep).flatten()
    x_dev, y_dev = data.train_x.device, data.train_y.device
    rest = ImageData(data.train_x[train.to(x_dev)], data.train_y[train.to(y_dev)], data.test_x, data.test_y,
                     data.classes, data.identity)
    return rest, data.train_x[val.to(x_dev)], data.train_y[val.to(y_dev)]


# ----------------------------------------------------------------------------- loading


def detect_layout(root: Path) -> str:
    """'archive', 'cifar10', 'imagefolder' or 'missing'; raises DataError for an unusable directory."""
    return locate(Path(root))[0]


def locate(root: Path) -> tuple[str, Path]:
    """(layout, path): the layout `detect_layout` reports and the path that holds it.

    The path is the archive for 'archive', the `cifar-10-batches-py` folder itself for
    'cifar10', the folder holding train/ and test/ for 'imagefolder', and `root` for
    'missing'. It differs from `root` when the data sits inside a single wrapping folder
    (an unpacked archive: root/<name>/cifar-10-batches-py or root/<name>/{train,test}).
    """
    if root.is_file():
        if root.name.endswith(ARCHIVE_SUFFIXES):
            return "archive", root
        raise DataError(f"data.root '{root}' is a file but not a .tar.gz/.tgz/.tar archive. {LAYOUTS}")
    if not root.exists():
        return "missing", root
    if (root / CIFAR_DIR).is_dir():
        return "cifar10", root / CIFAR_DIR
    if root.name == CIFAR_DIR:
        return "cifar10", root
    if (root / "train").is_dir() or (root / "test").is_dir():
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        if missing:
            raise DataError(f"ImageFolder '{root}' has no {missing[0]}/ folder; it needs both train/ and test/, "
                            f"each with one folder per class. {LAYOUTS}")
        return "imagefolder", root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1:  # an unpacked archive: root/<name>/{train,test} or root/<name>/cifar-10-batches-py
        return locate(children[0])
    raise DataError(f"data.root '{root}' is neither a CIFAR-10 directory nor an ImageFolder with train/ and "
                    f"test/. {LAYOUTS}")


def _decode(raw: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for bad files
        raise DataError(f"cannot decode image '{name}': {exc}") from exc


def _stack(images: list[np.ndarray], where: str) -> torch.Tensor:
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"images under '{where}' differ in size ({sorted(shapes)[:3]}...); all must be the same")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _check_classes(where: str, train: list[str], test: list[str]) -> None:
    if not train:
        raise DataError(f"ImageFolder '{where}' has no class folders under train/. {LAYOUTS}")
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataError(f"ImageFolder '{where}': the class folders of train/ and test/ differ "
                        f"(only in train: {only_train}; only in test: {only_test}); they must hold the same classes.")


def _expected_counts(classes: list[str], manifest: bytes | None, where: str) -> tuple[dict, str] | None:
    """({split: {class: images}}, whose word it is) when the layout states its counts, else None:
    the ImageFolder's counts.json, or CIFAR-10's 5,000 + 1,000 per class when its classes are CIFAR-10's."""
    if manifest is not None:
        try:
            counts = json.loads(manifest)
            counts = {split: {str(c): int(n) for c, n in counts[split].items()} for split in ("train", "test")}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"'{where}/{COUNTS_FILE}' is not a counts manifest ({type(exc).__name__}: {exc}); it "
                            f"must hold {{\"train\": {{class: images}}, \"test\": {{class: images}}}}, or be "
                            f"removed.") from None
        return counts, COUNTS_FILE
    if sorted(classes) == sorted(CIFAR10_CLASSES):
        return {split: dict.fromkeys(CIFAR10_CLASSES, n) for split, n in CIFAR10_PER_CLASS.items()}, "CIFAR-10"
    return None


def _check_counts(data: ImageData, where: str, expected: tuple[dict, str] | None) -> None:
    """DataError naming the first class whose image count differs from what the layout states."""
    if expected is None:
        return
    counts, source = expected
    problems = []
    for split, labels in (("train", data.train_y), ("test", data.test_y)):
        have = dict(zip(data.classes, torch.bincount(labels.cpu(), minlength=len(data.classes)).tolist()))
        for cls in sorted(set(counts[split]) | set(have)):
            want, got = counts[split].get(cls, 0), have.get(cls, 0)
            if want != got:
                problems.append(f"class '{cls}' has {got:,} {split} images where {source} says {want:,}")
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise DataError(f"data '{where}' is incomplete: {problems[0]}{more}. Re-download or re-create it "
                        f"(a damaged copy or an interrupted unpack loses images).")


def _from_files(split_files: dict[str, list[tuple[str, str, bytes | Path]]], where: str,
                manifest: bytes | None) -> ImageData:
    """Build ImageData from {split: [(class, name, bytes-or-path)]}, checking the counts the layout states."""
    classes = {s: sorted({c for c, _, _ in files}) for s, files in split_files.items()}
    _check_classes(where, classes["train"], classes["test"])
    index = {c: i for i, c in enumerate(classes["train"])}
    out = {}
    for split, files in split_files.items():
        files = sorted(files, key=lambda f: (f[0], f[1]))
        if not files:
            raise DataError(f"ImageFolder '{where}' has no images under {split}/.")
        images = [_decode(src.read_bytes() if isinstance(src, Path) else src, f"{where}/{split}/{c}/{n}")
                  for c, n, src in files]
        out[split] = (_stack(images, f"{where}/{split}"), torch.tensor([index[c] for c, _, _ in files]))
    data = ImageData(*out["train"], *out["test"], classes["train"])
    _check_counts(data, where, _expected_counts(data.classes, manifest, where))
    return data


def _imagefolder_files(root: Path) -> dict[str, list[tuple[str, str, str]]]:
    """{split: [(class, file name, path)]}: every image file ImageFolder `root` is read from.

    Class folders are the sub-folders of train/ and test/; images are their files with an
    image suffix. Sorted by class and name, so the listing (and the cache key built from
    it) is deterministic.
    """
    out: dict[str, list[tuple[str, str, str]]] = {}
    for split in ("train", "test"):
        with os.scandir(root / split) as it:
            class_dirs = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
        files = []
        for cdir in class_dirs:
            with os.scandir(cdir.path) as it:
                names = sorted(e.name for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
            files.extend((cdir.name, name, os.path.join(cdir.path, name)) for name in names)
        out[split] = files
    return out


def _load_imagefolder(root: Path) -> ImageData:
    split_files = {split: [(c, name, Path(path)) for c, name, path in files]
                   for split, files in _imagefolder_files(root).items()}
    manifest = root / COUNTS_FILE
    return _from_files(split_files, str(root), manifest.read_bytes() if manifest.is_file() else None)


def _cifar_batches(files: dict[str, bytes | Path], where: str) -> ImageData:
    """CIFAR-10 from its python batches, given as {file name: bytes-or-path}."""
    missing = [name for name in CIFAR_FILES if name not in files]
    if missing:
        raise DataError(f"CIFAR-10 '{where}' lacks {', '.join(missing)}; a complete CIFAR-10 python folder "
                        f"({CIFAR_DIR}/) holds {', '.join(CIFAR_FILES)}. Re-download or re-extract it. {LAYOUTS}")

    def load(name: str, keys: tuple[str, ...]) -> dict:
        src = files[name]
        try:
            batch = pickle.loads(src.read_bytes() if isinstance(src, Path) else src, encoding="latin1")
            absent = [k for k in keys if k not in batch]
        except Exception as exc:  # unpickling raises several types for a truncated or foreign file
            raise DataError(f"CIFAR-10 '{where}': {name} cannot be read as a CIFAR-10 python batch "
                            f"({type(exc).__name__}: {exc}). Re-download or re-extract it.") from exc
        if absent:
            raise DataError(f"CIFAR-10 '{where}': {name} has no {absent[0]!r} entry; it is not a CIFAR-10 "
                            f"python batch. Re-download or re-extract it.")
        return batch

    def images(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [load(name, ("data", "labels")) for name in names]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b["labels"] for b in batches])
        return torch.from_numpy(x.copy()), torch.from_numpy(y).long()

    train = images([f"data_batch_{i}" for i in range(1, 6)])
    test = images(["test_batch"])
    classes = load("batches.meta", ("label_names",))["label_names"]
    data = ImageData(*train, *test, list(classes))
    _check_counts(data, where, _expected_counts(data.classes, None, where))
    return data


def _load_cifar_dir(batches: Path) -> ImageData:
    """CIFAR-10 from an existing `cifar-10-batches-py` folder."""
    return _cifar_batches({name: batches / name for name in CIFAR_FILES if (batches / name).is_file()},
                          str(batches))


def _download_cifar10(root: Path) -> ImageData:
    """CIFAR-10 downloaded by torchvision into a temporary folder beside `root`, renamed to `root` once
    complete; a failed download leaves nothing behind, so the next run reports the same problem."""
    from torchvision.datasets import CIFAR10

    if not root.parent.is_dir():
        raise DataError(f"data.root '{root}' does not exist, nor does its folder '{root.parent}'. Point data.root "
                        f"at an existing dataset, or at a new folder inside an existing one to download CIFAR-10 "
                        f"there. {LAYOUTS}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".download", dir=root.parent))
    try:
        CIFAR10(str(tmp), train=True, download=True)  # the whole archive, both splits, md5-checked
        data = _cifar_batches({name: tmp / CIFAR_DIR / name for name in CIFAR_FILES}, str(root))
        try:
            tmp.rename(root)
        except OSError:  # another run finished the same download first: use its copy
            if not root.is_dir():
                raise
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.root '{root}' does not exist and CIFAR-10 could not be downloaded into it "
                        f"({type(exc).__name__}: {exc}); nothing was created there. Point data.root at a "
                        f"dataset on disk, or retry with network access. {LAYOUTS}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


class _Tap:
    """A read-only stream passing on `source`'s bytes; it counts them, hashes them (with `digest`) and
    keeps at least the last `keep` of them."""

    def __init__(self, source, digest: bool = False, keep: int = 0) -> None:
        self.source = source
        self.sha = hashlib.sha256() if digest else None
        self.count = 0
        self.keep = keep
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_len = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        if self.sha is not None:
            self.sha.update(data)
        if self.keep and data:
            self.tail.append(data)
            self.tail_len += len(data)
            while self.tail_len - len(self.tail[0]) >= self.keep:
                self.tail_len -= len(self.tail.popleft())
        return data

    def since(self, offset: int) -> bytes | None:
        """The bytes read from `offset` on, or None when they are no longer kept."""
        start = self.count - self.tail_len
        return b"".join(self.tail)[offset - start:] if offset >= start else None

    def drain(self) -> tuple[int, bool]:
        """Read to the end: (bytes read, whether they were all zero)."""
        size, zero = 0, True
        while chunk := self.read(CHUNK):
            size += len(chunk)
            zero = zero and not chunk.strip(b"\0")
        return size, zero


def file_digest(path: Path) -> str:
    """sha256 of a file, in one streaming pass."""
    with open(path, "rb") as f:
        tap = _Tap(f, digest=True)
        tap.drain()
    return tap.sha.hexdigest()


def _read_archive(path: Path) -> tuple[dict[str, list], dict[str, bytes], bytes | None, str]:
    """(ImageFolder files {split: [(class, name, bytes)]}, CIFAR-10 batches {name: bytes}, the
    counts.json beside train/ and test/ or None, the archive's sha256), read as one verified stream.

    gzip checks its CRC and length at the end of the stream, so the stream is read to its end;
    tarfile stops silently at a damaged header, so all that follows its last member must be zeros.
    """
    split_files: dict[str, list] = {"train": [], "test": []}
    cifar: dict[str, bytes] = {}
    manifests: dict[tuple, bytes] = {}
    folders: set[tuple] = set()  # the folders holding train/ and test/
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        raw = _Tap(f, digest=True)
        stream = _Tap(gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw, keep=4 * tarfile.RECORDSIZE)
        try:
            with tarfile.open(fileobj=stream, mode="r|" if gzipped else "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = Path(member.name).parts
                    data = tar.extractfile(member).read()  # tarfile raises ReadError when a member ends early
                    if len(parts) >= 2 and parts[-2] == CIFAR_DIR:
                        cifar[parts[-1]] = data
                    elif (len(parts) >= 3 and parts[-3] in split_files
                          and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES):
                        split_files[parts[-3]].append((parts[-2], parts[-1], data))
                        folders.add(parts[:-3])
                    elif parts[-1] == COUNTS_FILE:
                        manifests[parts[:-1]] = data
                stop = tar.offset  # where tarfile found no further member
        except tarfile.TarError:
            stream.drain()  # garbled compressed bytes show as tar errors first: gzip names the cause, if it is one
            raise
        end = stream.since(stop)
        rest, zero = stream.drain()  # to the end of the gzip stream: its CRC and length are checked there
        if end is None:
            raise DataError(f"archive '{path}': reading stopped at byte {stop:,} of the tar stream, too far back "
                            f"to check what follows. Re-create the archive with tar.")
        if end.strip(b"\0") or not zero:
            raise DataError(f"archive '{path}' is corrupt: the tar header at byte {stop:,} of the uncompressed "
                            f"stream is damaged and the {len(end) + rest:,} bytes from there on were not read. "
                            f"Re-download or re-create the archive.")
        if len(end) + rest < TAR_END:
            raise DataError(f"archive '{path}' is truncated: it ends at byte {stop:,} of the tar stream without "
                            f"the end-of-archive blocks. Re-download or re-create the archive.")
        raw.drain()
    manifest = manifests.get(next(iter(folders))) if len(folders) == 1 else None
    return split_files, cifar, manifest, raw.sha.hexdigest()


def _load_archive(path: Path) -> tuple[ImageData, str]:
    """The archive's images, checked whole, and its sha256 (from the same pass)."""
    try:
        split_files, cifar, manifest, digest = _read_archive(path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"archive '{path}' cannot be read whole ({type(exc).__name__}: {exc}): it is truncated, "
                        f"corrupt or not a tar archive. Re-download or re-create it.") from None
    if any(name in cifar for name in CIFAR_FILES) or (cifar and not any(split_files.values())):
        return _cifar_batches(cifar, str(path)), digest
    if not split_files["train"] and not split_files["test"]:
        raise DataError(f"archive '{path}' holds neither {CIFAR_DIR}/ nor train/<class>/ and test/<class>/ images. "
                        f"{LAYOUTS}")
    for split in split_files:
        if not split_files[split]:
            raise DataError(f"archive '{path}' has no {split}/<class>/ images; an ImageFolder archive needs both "
                            f"train/ and test/. {LAYOUTS}")
    return _from_files(split_files, str(path), manifest), digest


def content_digest(data: ImageData) -> str:
    """sha256 of the decoded dataset: each tensor's name, dtype, shape and bytes, then the class names.
    The same for an archive and its unpacked folder."""
    h = hashlib.sha256()
    for name in ("train_x", "train_y", "test_x", "test_y"):
        tensor = getattr(data, name).detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(tensor.numpy().data)
    h.update(json.dumps(list(data.classes)).encode())
    return h.hexdigest()


def _identify(data: ImageData, digest: str | None = None) -> ImageData:
    """`data` with its identity: `digest` (content_digest, when already known) and its counts."""
    identity = DataIdentity(digest or content_digest(data), int(data.train_y.numel()), int(data.test_y.numel()),
                            len(data.classes))
    return ImageData(data.train_x, data.train_y, data.test_x, data.test_y, data.classes, identity)


def _source_key(root: Path, layout: str) -> str:
    """The cache key of an archive or ImageFolder: a digest of its content (see the module docstring)."""
    if layout == "archive":
        return file_digest(root)
    # Every image the loader reads: relative path, size and mtime, and their count. The folders' own
    # mtimes would miss an image added, replaced or deleted inside a class folder.
    h = hashlib.sha256(f"imagefolder|{root.resolve()}".encode())
    count = 0
    for split, files in _imagefolder_files(root).items():
        for c, name, path in files:
            stat = os.stat(path)
            h.update(os.fsencode(f"{split}/{c}/{name}") + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    manifest = root / COUNTS_FILE
    if manifest.is_file():
        h.update(manifest.read_bytes())
    h.update(f"images={count}".encode())
    return h.hexdigest()


def _read_cache(cache: Path, source: str) -> ImageData | None:
    """The cached data of `source`, or None (with a warning) when the file is unreadable, truncated, made
    from another source, or its tensors do not match the digest stored with them."""
    try:
        blob = torch.load(cache, weights_only=True)
        data = ImageData(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], list(blob["classes"]))
        tensors = (data.train_x, data.train_y, data.test_x, data.test_y)
        if blob["source"] != source:
            problem = "made from another source"
        elif [t.dtype for t in tensors] != [torch.uint8, torch.int64] * 2 or data.train_x.ndim != 4 \
                or data.test_x.shape[1:] != data.train_x.shape[1:] or len(data.train_x) != len(data.train_y) \
                or len(data.test_x) != len(data.test_y):
            problem = "tensors of the wrong type or shape"
        elif content_digest(data) != blob["digest"]:
            problem = "tensors differ from their stored digest"
        else:
            return _identify(data, blob["digest"])
    except Exception as exc:  # torch.load raises many types for a truncated or foreign file
        problem = f"{type(exc).__name__}: {exc}"
    log.warning("decoding again: the data cache %s is not usable (%s)", cache, problem)
    return None


def _write_cache(cache: Path, data: ImageData, source: str) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
                           "test_y": data.test_y, "classes": data.classes, "source": source,
                           "digest": data.identity.digest}, cache)
        log.info("cached decoded images at %s", cache)
    except OSError as exc:
        log.warning("could not write the data cache %s (%s); continuing without it", cache, exc)


def load_images(root: str | os.PathLike, download: bool = True, cache_dir: str | os.PathLike | None = None) -> ImageData:
    """Load both splits of the dataset at `root` as uint8 tensors with their identity, using or filling the cache."""
    root = Path(root).expanduser()
    layout, where = locate(root)
    if layout == "missing":
        if not download:
            raise DataError(f"data.root '{root}' does not exist and data.download=false; point data.root (or "
                            f"ABLATION_DATA) at the dataset. {LAYOUTS}")
        log.info("data.root %s is absent: downloading CIFAR-10 with torchvision", root)
        return _identify(_download_cifar10(root))
    if where != root:
        log.info("data.root %s: reading the %s data in %s", root, layout, where)
    if layout == "cifar10":
        return _identify(_load_cifar_dir(where))
    root = where
    source = _source_key(root, layout) if cache_dir else None
    cache = Path(cache_dir).expanduser() / f"{root.name.split('.')[0]}-{source[:16]}.pt" if source else None
    if cache is not None and cache.exists() and (data := _read_cache(cache, source)) is not None:
        return data
    log.info("decoding %s (%s) once into uint8 tensors", root, layout)
    if layout == "archive":
        data, read = _load_archive(root)
        if source is not None and read != source:
            raise DataError(f"archive '{root}' changed while it was read (sha256 {source[:16]}... then "
                            f"{read[:16]}...); wait until it is completely written, then rerun.")
    else:
        data = _load_imagefolder(root)
    data = _identify(data)
    if cache is not None:
        _write_cache(cache, data, source)
    return data


# ----------------------------------------------------------------------------- batches


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the Tanh output's range."""
    return x.float().div_(127.5).sub_(1.0)


def augment(x: torch.Tensor, flip: bool, padding: int, generator: torch.Generator,
            pad_mode: str = "zeros") -> torch.Tensor:
    """Random horizontal flip (p=0.5) and random crop after padding, per image, batch-wise.

    Equivalent in distribution to torchvision's RandomHorizontalFlip() and
    RandomCrop(size, padding=padding) with fill 0 (pad_mode="zeros") or
    padding_mode="reflect" (pad_mode="reflect"): the crop offsets are uniform over
    (2*padding+1)^2 positions. Works on uint8 or float tensors on any device; the random
    draws come from `generator`, which lives on the same device as `x` (no host round trip).

    Flip, pad and crop are one gather from the padded batch: flipping commutes with the
    left-right symmetric zero or reflect padding, so a flipped image's crop at column offset ox reads padded
    columns W'-1-ox-j instead of ox+j (W' the padded width).
    """
    n, c, h, w = x.shape
    dev = x.device
    flipped = torch.rand(n, generator=generator, device=dev) < 0.5 if flip else None
    if padding > 0:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding),
                                    mode="constant" if pad_mode == "zeros" else "reflect")
        oy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
    else:
        oy = ox = torch.zeros(n, 1, dtype=torch.long, device=dev)
    wp = w + 2 * padding
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if flip:
        cols = torch.where(flipped.view(n, 1), (wp - 1) - cols, cols)
    index = (rows.view(n, 1, h, 1) * wp + cols.view(n, 1, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, -1), 2, index).view(n, c, h, w)


class TrainBatches:
    """Shuffled training batches from a uint8 tensor on the device, augmented there.

    The permutation and augmentation draws come from one generator on the images' device
    (so a GPU step never waits for the host), whose state is part of the checkpoint: a
    resumed run sees exactly the same batches.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, flip: bool, padding: int, seed: int,
                 pad_mode: str = "zeros") -> None:
        self.images = images
        self.batch_size = batch_size
        self.flip = flip
        self.padding = padding
        self.pad_mode = pad_mode
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.images.shape[0]
        order = torch.randperm(n, generator=self.generator, device=self.images.device)
        for start in range(0, n, self.batch_size):
            x = self.images[order[start:start + self.batch_size]]
            if self.flip or self.padding:
                x = augment(x, self.flip, self.padding, self.generator, self.pad_mode)
            yield to_unit_range(x)


def eval_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The images in order, unaugmented, scaled to [-1, 1]."""
    for start in range(0, images.shape[0], batch_size):
        yield to_unit_range(images[start:start + batch_size])
