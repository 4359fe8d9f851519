"""Reading and writing safetensors files one tensor at a time, bfloat16 included, no framework.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian data. Reading it directly (instead
of through `safetensors.numpy`, which has no bfloat16, or a framework loader, which lands every
tensor on one device) lets the checkpoint loader hold exactly one tensor in host memory at a
time and check every header against the file before reading any data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_LIMIT = 100 << 20  # a header larger than 100 MB is a corrupt file, not a checkpoint


class CorruptFileError(ValueError):
  """A safetensors file whose header or data does not hold together (named in the message)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset of the data in the file
  end: int


def read_header(path: str) -> dict[str, TensorInfo]:
  """Every tensor's info, checked: known dtype, byte range matching its shape, inside the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CorruptFileError(f"{path}: {size} bytes is too short for a safetensors file")
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > min(_HEADER_LIMIT, size - 8):
      raise CorruptFileError(f"{path}: header length {header_length} exceeds the file")
    try:
      header = json.loads(f.read(header_length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CorruptFileError(f"{path}: the header is not valid JSON ({e})") from e
  data_start = 8 + header_length
  infos = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
      raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(o) for o in entry["data_offsets"])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected:
      raise CorruptFileError(f"{path}: tensor {name!r} {shape} {entry['dtype']} needs {expected} "
                             f"bytes but its byte range holds {end - begin}")
    if data_start + end > size:
      raise CorruptFileError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the "
                             f"file has {size} bytes (truncated?)")
    infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
  return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
  """One tensor's data as a fresh numpy array (the only host copy the loader makes)."""
  array = np.empty(info.shape, dtype=info.dtype)
  with open(info.path, "rb") as f:
    f.seek(info.start)
    if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != info.end - info.start:
      raise CorruptFileError(f"{info.path}: tensor {info.name!r} is truncated")
  return array


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]],
               metadata: dict[str, str] | None = None) -> None:
  """Writes (name, array) pairs; arrays are consumed one at a time (the header comes first,
  so shapes and dtypes are needed up front but data is written as it is produced)."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, array in tensors:
    nbytes = array.size * array.dtype.itemsize
    header[name] = {"dtype": _NAMES[np.dtype(array.dtype)], "shape": list(array.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).tobytes())
