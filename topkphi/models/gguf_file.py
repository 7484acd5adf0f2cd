"""Read a GGUF file's header with the standard library: metadata, tensor table, and a size check.

Enough to reject a corrupt or truncated file in milliseconds, before torch or mlx is imported.
Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from topkphi.models.errors import ModelError

MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (8 = string, 9 = array are handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (bytes per block, elements per block); types missing here skip the size check.
GGML_BLOCK = {
    0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32), 8: (34, 32),
    9: (36, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256),
    15: (292, 256), 24: (1, 1), 25: (2, 1), 26: (4, 1), 27: (8, 1), 28: (8, 1), 30: (2, 1),
}
GGML_NAME = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    metadata: dict  # arrays not asked for are kept as their length only
    tensors: list[GgufTensor]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


class _Reader:
    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise ModelError(f"{self.path}: truncated GGUF header (incomplete download?)")
        return struct.unpack("<" + fmt, raw)[0]

    def string(self) -> str:
        n = self.take("Q")
        if n > 1 << 30:
            raise ModelError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        raw = self.f.read(n)
        if len(raw) != n:
            raise ModelError(f"{self.path}: truncated GGUF header (incomplete download?)")
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            if etype in _SCALAR and not keep:  # skip fixed-size arrays without parsing them
                self.f.seek(n * struct.calcsize("<" + _SCALAR[etype]), 1)
                return n
            items = [self.value(etype, keep) for _ in range(n)]
            return items if keep else n
        raise ModelError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


def read_gguf_header(path: str | Path, keep_arrays: tuple[str, ...] = ()) -> GgufHeader:
    """Parse the header of ``path`` and check the file holds every tensor it lists.

    ``keep_arrays`` names the array-valued keys to return in full (e.g. ``tokenizer.ggml.tokens``).
    Raises ModelError for a file that is not GGUF, is corrupt, or is cut short.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if f.read(4) != MAGIC:
            raise ModelError(f"{path}: not a GGUF file (bad magic bytes)")
        r = _Reader(f, path)
        version = r.take("I")
        if version not in (2, 3):
            raise ModelError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.take("I"), keep=key in keep_arrays)
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.take("I")
            if n_dims > 8:
                raise ModelError(f"{path}: corrupt GGUF header (tensor {name} has {n_dims} dims)")
            shape = tuple(r.take("Q") for _ in range(n_dims))
            tensors.append(GgufTensor(name, shape, r.take("I"), r.take("Q")))
        align = int(metadata.get("general.alignment", 32))
        data_offset = -(-f.tell() // align) * align
        size = path.stat().st_size
    for t in tensors:
        bytes_per, per_block = GGML_BLOCK.get(t.ggml_type, (0, 1))
        n = 1
        for d in t.shape:
            n *= d
        if data_offset + t.offset + n // per_block * bytes_per > size:
            raise ModelError(
                f"{path}: truncated GGUF file, tensor {t.name} ends past the end of the file "
                f"({size} bytes; incomplete download?)"
            )
    return GgufHeader(path, metadata, tensors, data_offset)
