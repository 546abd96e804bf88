"""GGUF header parsing.

`gguf.GGUFReader` builds a numpy view per array element, which takes seconds on a 150k-token vocabulary;
this parser reads the same header with one pass of `struct` and maps tensor data lazily, so start-up
cost is the file's metadata, not its vocabulary size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF stores ne innermost first)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _mmap: np.memmap | None = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file (no copy)."""
        info = self.tensors[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[info.offset : info.offset + info.nbytes]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class GGUFError(ValueError):
    """A file that is not a GGUF we can read."""


def _tensor_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    if shape and shape[-1] % block:
        raise GGUFError(f"row length {shape[-1]} is not a multiple of {qtype.name}'s block size {block}")
    return n // block * type_size


def read_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    data = path.read_bytes() if path.stat().st_size < (1 << 20) else None
    with path.open("rb") as f:
        if data is None:
            # Only the header is parsed eagerly; read in growing chunks until it fits.
            size = 1 << 20
            while True:
                f.seek(0)
                data = f.read(size)
                try:
                    return _parse(path, data)
                except _NeedMore:
                    if len(data) < size:
                        raise GGUFError(f"{path}: truncated GGUF header") from None
                    size *= 4
        return _parse(path, data)


class _NeedMore(Exception):
    pass


def _parse(path: Path, data: bytes) -> GGUFFile:
    view = memoryview(data)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(view):
            raise _NeedMore
        (v,) = struct.unpack_from(fmt, view, pos)
        pos += n
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(view):
            raise _NeedMore
        s = bytes(view[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = take("<I"), take("<Q")
            if etype == _STRING:
                return [string() for _ in range(count)]
            if etype == _ARRAY:
                return [value(_ARRAY) for _ in range(count)]
            if etype not in _SCALARS:
                raise GGUFError(f"{path}: unknown GGUF array element type {etype}")
            dt = np.dtype(_SCALARS[etype][1])
            end = pos + dt.itemsize * count
            if end > len(view):
                raise _NeedMore
            arr = np.frombuffer(view[pos:end], dtype=dt)
            pos = end
            return arr.astype(bool).tolist() if etype == _BOOL else arr.tolist()
        if vtype not in _SCALARS:
            raise GGUFError(f"{path}: unknown GGUF value type {vtype}")
        v = take(_SCALARS[vtype][0])
        return bool(v) if vtype == _BOOL else v

    if bytes(view[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(view[:4])!r})")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = take("<Q"), take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("<I"))

    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        ne = [take("<Q") for _ in range(n_dims)]
        raw_type = take("<I")
        offset = take("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has unknown ggml type id {raw_type}") from None
        infos.append((name, tuple(reversed(ne)), qtype, offset))

    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (pos + align - 1) // align * align
    file_size = path.stat().st_size
    tensors = {}
    for name, shape, qtype, offset in infos:
        nbytes = _tensor_nbytes(qtype, shape)
        start = data_start + offset
        if start + nbytes > file_size:
            raise GGUFError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
        tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
    return GGUFFile(path, metadata, tensors)
