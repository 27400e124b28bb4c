"""Write a checkpoint directory atomically: safetensors shards, their index, and side files.

Everything goes into a hidden temporary sibling of the output, renamed into place only by
`finalize()`, so an interrupted conversion never leaves a directory that looks complete.
The output is a pure function of what was added, in order: no timestamps, no random names.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import struct

import torch

from commonkv_convert.errors import UserInputError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Decimal units are powers of 1000, as on the Hub and in transformers' max_shard_size.
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in "500MB", "2GB", "1.5GiB" or "1000", so flags and the library accept the same forms."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = (match.group(2).lower() or "b") if match else None
        if match is None or unit not in _UNITS:
            size = 0
        else:
            size = round(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UserInputError(
            f"Invalid size {text!r}. To resolve, pass a positive number of bytes or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 500MB, 2GB or 1.5GiB."
        )
    return size


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class CheckpointWriter:
    """Context manager that fills shards of at most `max_shard_size` bytes and publishes them at once.

    A tensor larger than the limit gets a shard of its own. Leaving the `with` block without
    `finalize()` (or with an exception) removes everything written, and a pre-existing output is
    only replaced by a successful `finalize()`.
    """

    def __init__(self, out_dir: Path | str, *, max_shard_size: int | str = "2GB", overwrite: bool = False,
                 tmp_dir: Path | None = None, shards_done: list[dict] = (),
                 on_shard: Callable[[int, Path, list[str], int], None] | None = None) -> None:
        """`tmp_dir`, `shards_done` and `on_shard` make writing resumable: shards are built in `tmp_dir`, which
        an error leaves in place; the shards listed in `shards_done` (file, tensors, data_bytes, as recorded
        by `on_shard(index, path, tensors, data_bytes)` when each was closed) are kept and their tensors
        skipped, so adding the same tensors in the same order again yields the same files."""
        self.out_dir = Path(out_dir).expanduser().absolute()
        self._fixed_tmp = tmp_dir
        self._done = list(shards_done)
        self._on_shard = on_shard
        self.max_shard_size = parse_size(max_shard_size)
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._created_parents: list[Path] = []
        self._buffer: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, data offsets
        self._data = None  # the open data file of the shard being filled
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each flushed shard, in order
        self._names: set[str] = set()
        self._restored: set[str] = set()
        self._total_bytes = 0
        self._finalized = False

    def __enter__(self) -> CheckpointWriter:
        self._check_out_dir()
        parent = self.out_dir.parent
        self._created_parents = [p for p in (parent, *parent.parents) if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        if self._fixed_tmp is None:
            self._tmp = parent / f".{self.out_dir.name}.tmp-{secrets.token_hex(6)}"
            self._tmp.mkdir()
            return self
        self._tmp = self._fixed_tmp
        self._tmp.mkdir(parents=True, exist_ok=True)
        keep = {shard["file"] for shard in self._done}
        for stale in self._tmp.iterdir():  # a partly written shard, side files: all are written again
            if stale.name not in keep:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self._shards = [list(shard["tensors"]) for shard in self._done]
        self._names = {name for shard in self._shards for name in shard}
        self._restored = set(self._names)
        self._total_bytes = sum(shard["data_bytes"] for shard in self._done)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._finalized:
            self._discard()

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Stream the tensor's bytes to the current shard's data file; start a new shard when it would overflow.

        Nothing is buffered in memory, so writing a checkpoint costs one tensor of RAM at a time.
        """
        tmp = self._require_open()
        if name in self._restored:
            return  # in a shard kept from an interrupted run
        if name in self._names:
            raise ValueError(f"Tensor {name} was already added to {self.out_dir}.")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"Tensor {name} has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self._flush()
        if self._data is None:
            self._data = open(tmp / f".shard-{len(self._shards):05d}.data", "wb")  # noqa: SIM115 - closed in _flush
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._data.write(memoryview(flat.view(torch.uint8).numpy()) if size else b"")  # no copy of the bytes
        self._buffer[name] = (_DTYPES[tensor.dtype], list(tensor.shape), self._buffer_bytes, self._buffer_bytes + size)
        self._names.add(name)
        self._buffer_bytes += size

    def written(self, name: str) -> bool:
        """Whether `name` is already in a shard (kept from an interrupted run, or added before)."""
        return name in self._names

    def write_json(self, relpath: str, obj: Any) -> None:
        _dump_json(self._target(relpath), obj)

    def write_text(self, relpath: str, text: str) -> None:
        self._target(relpath).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path | str, relpath: str | None = None) -> None:
        """Copy bytes only (no timestamps), under `relpath` or the source's own name."""
        shutil.copyfile(src, self._target(relpath or Path(src).name))

    def finalize(self) -> Path:
        """Write the last shard and the index, then move the finished directory into place."""
        tmp = self._require_open()
        if self._buffer:
            self._flush()
        self._name_shards(tmp)
        self._check_out_dir()
        old = self._move_aside()
        self._swap_in(tmp, old)
        self._finalized = True
        if old is not None:
            shutil.rmtree(old)
        return self.out_dir

    def _require_open(self) -> Path:
        if self._tmp is None or self._finalized:
            raise RuntimeError(
                "CheckpointWriter is not open: use `with CheckpointWriter(out) as writer:` and call finalize() once."
            )
        return self._tmp

    def _check_out_dir(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(
                f"{self.out_dir} exists and is not a directory. To resolve, choose another output directory."
            )
        if self.out_dir.exists() and not self.overwrite:
            raise UserInputError(
                f"{self.out_dir} exists. To resolve, pass --overwrite or choose another output directory."
            )

    def _target(self, relpath: str | Path) -> Path:
        """Where a side file goes; weights and the index are reserved for add_tensor/finalize."""
        tmp = self._require_open()
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"{relpath!r} must be a relative path inside the checkpoint.")
        if rel.name.endswith(".safetensors") or rel.name == INDEX_NAME:
            raise ValueError(f"{relpath!r} is reserved: weights are written with add_tensor().")
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _flush(self) -> None:
        """Close the data file and prepend the safetensors header (8-byte length + JSON, space-padded)."""
        tmp = self._require_open()
        data_path = tmp / f".shard-{len(self._shards):05d}.data"
        self._data.close()
        self._data = None
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, (dtype, shape, begin, end) in self._buffer.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(tmp / f".shard-{len(self._shards):05d}.safetensors", "wb") as shard, open(data_path, "rb") as data:
            shard.write(struct.pack("<Q", len(encoded)) + encoded)
            shutil.copyfileobj(data, shard, 16 * 2**20)
        data_path.unlink()
        if self._on_shard is not None:
            self._on_shard(len(self._shards), tmp / f".shard-{len(self._shards):05d}.safetensors",
                           list(self._buffer), self._buffer_bytes)
        self._shards.append(list(self._buffer))
        self._total_bytes += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0

    def _name_shards(self, tmp: Path) -> None:
        """Give shards their final names now that their count is known; an index only for several."""
        names = _shard_names(len(self._shards))
        for k, name in enumerate(names):
            (tmp / f".shard-{k:05d}.safetensors").rename(tmp / name)
        if len(names) > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self._shards) for tensor in tensors}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            _dump_json(tmp / INDEX_NAME, index)

    def _move_aside(self) -> Path | None:
        """Rename an output being overwritten out of the way; it is deleted once the new one is in."""
        if not self.out_dir.exists():
            return None
        old = self.out_dir.with_name(f".{self.out_dir.name}.old-{secrets.token_hex(6)}")
        self.out_dir.rename(old)
        return old

    def _swap_in(self, tmp: Path, old: Path | None) -> None:
        try:
            tmp.rename(self.out_dir)
        except OSError:
            if old is not None:
                old.rename(self.out_dir)
            raise

    def _discard(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._tmp is not None and self._fixed_tmp is None:  # a resumable tmp_dir stays for the next run
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        for parent in self._created_parents:  # deepest first; stops being possible once one is non-empty
            with suppress(OSError):
                parent.rmdir()
        self._buffer = {}
