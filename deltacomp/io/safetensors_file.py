"""Stream tensors in and out of safetensors files one at a time.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data buffer, fully covered by the tensors with no holes.

The reader validates the header against the file size before any tensor is read, so a truncated or
corrupt file fails at open with a message that names it. Each tensor is read with ``readinto`` into a
fresh buffer: no memory map stays resident, so peak memory is the tensors the caller holds.

The writer spools each tensor's bytes to disk as it arrives and assembles the final file on ``close``,
ordering tensors by descending element size (as the safetensors library does) so every tensor is
aligned to its element size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from deltacomp.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_COPY_CHUNK = 64 * 1024 * 1024


class TensorInfo:
    """Name, dtype, shape and byte range of one tensor in a file."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _whole(x) -> int:
    """A header size or offset: a non-negative JSON integer (ValueError otherwise)."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(x)
    return x


class SafetensorsReader:
    """Lazy reader of one safetensors file: header at open, one tensor per ``read``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors file "
                        f"(header of {n} bytes in a file of {size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to text)")
        self._data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry)
        data_len = max((t.end for t in self.tensors.values()), default=0)
        if self._data_start + data_len > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file (tensors need {self._data_start + data_len} "
                f"bytes, the file has {size})"
            )

    def _parse_entry(self, name: str, entry) -> TensorInfo:
        try:
            dtype = DTYPES[entry["dtype"]]
            if not isinstance(entry["shape"], list) or len(entry["data_offsets"]) != 2:
                raise TypeError
            shape = tuple(_whole(s) for s in entry["shape"])
            begin, end = (_whole(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt safetensors entry for tensor {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != expected:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors entry for {name!r}: {end - begin} bytes for shape "
                f"{list(shape)} of {entry['dtype']} (needs {expected})"
            )
        return TensorInfo(name, dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + info.begin)
                got = f.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e.strerror or e})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def read_sample(self, name: str, k: int) -> torch.Tensor:
        """Up to ``k`` evenly spaced elements of a tensor (flattened), read without loading it whole."""
        info = self.tensors[name]
        size = torch.empty((), dtype=info.dtype).element_size()
        numel = info.nbytes // size
        idx = sorted({round(i * (numel - 1) / max(k - 1, 1)) for i in range(min(k, numel))})
        buf = bytearray(len(idx) * size)
        with open(self.path, "rb") as f:
            for j, i in enumerate(idx):
                f.seek(self._data_start + info.begin + i * size)
                buf[j * size:(j + 1) * size] = f.read(size)
        return torch.frombuffer(buf, dtype=info.dtype) if buf else torch.empty(0, dtype=info.dtype)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor without holding them in memory.

    Bytes go to ``<path>.spool`` as tensors arrive; ``close`` writes the header and copies the data into
    ``path`` in alignment order, then removes the spool.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self._names: set[str] = set()
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice to {self.path}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        offset = self._spool.tell()
        self._spool.write(data)
        self._entries.append((name, t.dtype, tuple(t.shape), offset, len(data)))
        self._names.add(name)
        self.nbytes += len(data)

    def close(self) -> None:
        self._spool.close()
        order = sorted(self._entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
        header: dict[str, object] = {"__metadata__": self.metadata}
        pos = 0
        for name, dtype, shape, _, n in order:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for _, _, _, offset, n in order:
                spool.seek(offset)
                while n:
                    chunk = spool.read(min(n, _COPY_CHUNK))
                    out.write(chunk)
                    n -= len(chunk)
        self._spool_path.unlink()

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
