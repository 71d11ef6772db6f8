"""Read an offline W&B run back from its `run-<id>.wandb` file, for tests.

    from wandb_records import offline_run_dirs, read_run
    rec = read_run(run_dir / "wandb" / "offline-run-...")   # or the .wandb file itself
    rec.group, rec.tags, rec.config["dropout"], rec.history[-1]["test/recon"], rec.summary["status"]
    read_table(rec, rec.history[0]["claims/0123abcd"])["data"]        # a logged wandb.Table

The `.wandb` file is W&B's transaction log: every record the run produced, in order, as
`wandb.proto.wandb_internal_pb2.Record` protobufs. Since the Go core (wandb-core) writes it, wandb
0.31 has no Python reader (the old `wandb.sdk.internal.datastore.DataStore` is gone) and
`wandb.Api` reads only the server. The one public reader is the CLI `wandb leet inspect --json`,
which prints a display form (nested keys joined with '.', NaN as the string "NaN"), so this module
reads the file itself: the framing is the LevelDB log format, as wandb-core writes it
  * a 7-byte file header: b":W&B", magic 0xBEE1 (little endian), version 0;
  * 32 KiB blocks of chunks, each `crc32c:u32 length:u16 type:u8` then `length` bytes, where type
    1 = a whole record, 2/3/4 = first/middle/last piece of one; a block tail shorter than a chunk
    header is zero padding;
and each record is decoded with wandb's own protobuf definitions. Values are JSON in `value_json`
(`json.loads` also reads W&B's NaN/Infinity); a value logged as an object (a `wandb.Image`) is
written as one item per leaf with a `nested_key` path, rebuilt here into nested dicts. CRCs are not
checked (the stdlib has no crc32c); a truncated last record (a killed writer) is dropped.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")  # crc32c, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline W&B run wrote to disk."""

    path: Path  # the .wandb file
    run_id: str = ""
    name: str = ""  # display name
    group: str = ""
    job_type: str = ""
    project: str = ""
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the run's config (W&B adds a "_wandb" key)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per history row, file order
    summary: dict[str, Any] = field(default_factory=dict)  # all summary updates applied, the last wins
    exit_code: int | None = None  # from the exit record; None when the run never finished
    files: list[str] = field(default_factory=list)  # paths of files records, relative to the run's files/
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (name, type) of each logged artifact
    record_types: list[str] = field(default_factory=list)  # the record type of every record, in order

    @property
    def images(self) -> list[str]:
        """Keys of the history rows and the summary holding an image (`"_type": "image-file"`),
        and `media/images/*` files records."""
        keys = {k for d in (*self.history, self.summary) for k, v in d.items()
                if isinstance(v, dict) and v.get("_type") == "image-file"}
        return sorted(keys) + [f for f in self.files if f.startswith("media/images/")]

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def offline_run_dirs(root: str | Path) -> list[Path]:
    """Every `offline-run-*` directory below `root`, sorted."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())


def read_run(path: str | Path) -> OfflineRun:
    """Read a `run-*.wandb` file, or the one in an `offline-run-*` directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one run-*.wandb file in {path}, found {[p.name for p in found]}")
        path = found[0]
    out = OfflineRun(path=path)
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        out.record_types.append(kind)
        if kind == "run":
            r = rec.run
            out.run_id, out.name, out.group, out.job_type, out.project, out.entity = (
                r.run_id, r.display_name, r.run_group, r.job_type, r.project, r.entity)
            out.tags = list(r.tags)
            _apply(out.config, r.config.update, r.config.remove)
        elif kind == "config":
            _apply(out.config, rec.config.update, rec.config.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, rec.history.item)
            out.history.append(row)
        elif kind == "summary":
            _apply(out.summary, rec.summary.update, rec.summary.remove)
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
        elif kind == "files":
            out.files += [f.path for f in rec.files.files]
        elif kind == "artifact":
            out.artifacts.append((rec.artifact.name, rec.artifact.type))
    return out


def read_table(run: OfflineRun, value: dict) -> dict[str, Any]:
    """The table a history value (`"_type": "table-file"`) points to: {"columns": [...], "data": [[...]]}."""
    assert value.get("_type") == "table-file", value
    return json.loads((run.path.parent / "files" / value["path"]).read_text())


def records(path: str | Path) -> Iterator[pb.Record]:
    """The records of a .wandb file, in order."""
    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, pieces = len(_HEADER), []
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # zero padding at the end of a block
            pos += left
            continue
        if pos + _CHUNK.size > len(data):
            return
        _, length, kind = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        if kind == 0 and length == 0:  # a preallocated, never written tail
            return
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or pos + length > len(data):
            return  # a truncated or torn last chunk
        pieces.append(data[pos:pos + length])
        pos += length
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(pieces))
            pieces = []
            yield rec


def _apply(target: dict, items, removes=()) -> None:
    """Set each item's decoded value at its key (or nested_key path); delete removed keys."""
    for item in items:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = json.loads(item.value_json)
    for item in removes:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for k in keys[:-1]:
            node = node.get(k, {})
        node.pop(keys[-1], None)
