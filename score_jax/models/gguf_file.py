"""GGUF files (llama.cpp): metadata and tensors, read straight from a memory map.

    metadata = gguf_file.read_metadata("model.gguf", {"general.architecture"})
    metadata, tensors = gguf_file.read("model.gguf")
    w = tensors["token_embd.weight"].dequantize()   # float32, numpy axis order

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes
~10 s for SmolLM2's 49k-token vocabulary and ~20 s for Gemma's 262k; this walks the file once,
decodes only the keys asked for, and leaves tensor bytes in the memory map until dequantized.
"""

import dataclasses
import mmap
import os
import struct
from typing import Any, Callable, Container, Optional, Union

import gguf
import numpy as np

_ALIGNMENT = "general.alignment"  # Of the tensor data section; 32 bytes when not written.
_DEFAULT_ALIGNMENT = 32

_NUMBERS = {
    gguf.GGUFValueType.UINT8: np.dtype("<u1"), gguf.GGUFValueType.INT8: np.dtype("<i1"),
    gguf.GGUFValueType.UINT16: np.dtype("<u2"), gguf.GGUFValueType.INT16: np.dtype("<i2"),
    gguf.GGUFValueType.UINT32: np.dtype("<u4"), gguf.GGUFValueType.INT32: np.dtype("<i4"),
    gguf.GGUFValueType.UINT64: np.dtype("<u8"), gguf.GGUFValueType.INT64: np.dtype("<i8"),
    gguf.GGUFValueType.FLOAT32: np.dtype("<f4"), gguf.GGUFValueType.FLOAT64: np.dtype("<f8"),
    gguf.GGUFValueType.BOOL: np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of a GGUF file, not yet dequantized.

  Attributes:
    name: its GGUF name, e.g. "blk.0.attn_q.weight".
    shape: numpy order (outermost first; GGUF lists dimensions innermost first).
    qtype: its storage type (F32, F16, Q8_0, Q4_K, ...).
    data: its bytes, uint8 [nbytes], a view of the file's memory map.
  """
  name: str
  shape: tuple[int, ...]
  qtype: gguf.GGMLQuantizationType
  data: np.ndarray

  def dequantize(self) -> np.ndarray:
    """float32 values of shape `shape`, in memory of their own.

    An F32 tensor would otherwise come back as a view of the file's memory map, which keeps
    the whole map alive, and every page of it read so far resident, for as long as any such
    array lives (one 576-float norm kept SmolLM2's 96 MB file mapped through a sampling run).
    """
    values = gguf.quants.dequantize(self.data, self.qtype).reshape(self.shape)
    return values.copy() if np.may_share_memory(values, self.data) else values


def read_metadata(path: Union[str, os.PathLike],
                  keys: Optional[Container[str]] = None) -> dict[str, Any]:
  """The key/value metadata of a GGUF file (not its tensors).

  Args:
    path: a .gguf file.
    keys: the keys to decode (others are skipped); None decodes all.

  Returns:
    {key: value}: numbers and bools as Python scalars, strings as str, arrays of numbers as 1-D
    numpy arrays, arrays of strings (or of arrays) as lists.
  """
  wanted = (lambda key: True) if keys is None else keys.__contains__
  with _open(path) as buf:
    return _parse(path, buf, wanted, with_tensors=False)[0]


def read(path: Union[str, os.PathLike], wanted: Callable[[str], bool] = lambda key: True
         ) -> tuple[dict[str, Any], dict[str, Tensor]]:
  """The metadata (as `read_metadata`, of the keys `wanted` accepts) and {name: Tensor}, whose
  bytes stay in the file's memory map (closed when the last tensor is gone)."""
  return _parse(path, _open(path), wanted, with_tensors=True)


def _open(path: Union[str, os.PathLike]) -> mmap.mmap:
  with open(path, "rb") as f:
    if f.read(4) != struct.pack("<I", gguf.GGUF_MAGIC):
      raise ValueError(f"{path} is not a GGUF file")
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _parse(path: Union[str, os.PathLike], buf: mmap.mmap, wanted: Callable[[str], bool],
           with_tensors: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
  cursor = _Cursor(buf)
  try:
    _, version, num_tensors, num_kv = cursor.unpack("<IIQQ")
    if version not in gguf.READER_SUPPORTED_VERSIONS:
      raise ValueError(f"GGUF version {version} is not supported")
    metadata = {}
    for _ in range(num_kv):
      key = cursor.string()
      value_type = cursor.unpack("<I")[0]
      decode = wanted(key) or (with_tensors and key == _ALIGNMENT)
      value = cursor.value(value_type, decode=decode)
      if decode:
        metadata[key] = value
    if not with_tensors:
      return metadata, {}
    infos = []
    for _ in range(num_tensors):
      name = cursor.string()
      (num_dims,) = cursor.unpack("<I")
      dims = cursor.unpack(f"<{num_dims}Q")
      qtype, offset = cursor.unpack("<IQ")
      infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype), offset))
    alignment = metadata.get(_ALIGNMENT, _DEFAULT_ALIGNMENT)
    start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
      block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
      nbytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
      if start + offset + nbytes > len(buf):
        raise ValueError(f"tensor {name} runs past the end of the file")
      tensors[name] = Tensor(name, shape, qtype,
                             np.frombuffer(buf, np.uint8, nbytes, start + offset))
    return metadata, tensors
  except (struct.error, ValueError, KeyError) as e:
    raise ValueError(f"{path}: bad GGUF file ({e})") from None


class _Cursor:
  """Reads GGUF values from a buffer, front to back."""

  def __init__(self, buf: mmap.mmap):
    self._buf = buf
    self.pos = 0

  def unpack(self, fmt: str) -> tuple[Any, ...]:
    values = struct.unpack_from(fmt, self._buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return values

  def string(self, decode: bool = True) -> Optional[str]:
    (length,) = self.unpack("<Q")
    start, self.pos = self.pos, self.pos + length
    return self._buf[start:self.pos].decode("utf-8") if decode else None

  def value(self, value_type: int, decode: bool) -> Any:
    if value_type == gguf.GGUFValueType.STRING:
      return self.string(decode)
    if value_type == gguf.GGUFValueType.ARRAY:
      item_type, count = self.unpack("<IQ")
      if item_type in _NUMBERS:
        dtype = _NUMBERS[item_type]
        start, self.pos = self.pos, self.pos + count * dtype.itemsize
        return np.frombuffer(self._buf, dtype, count, start).copy() if decode else None
      items = [self.value(item_type, decode) for _ in range(count)]
      return items if decode else None
    if value_type in _NUMBERS:
      dtype = _NUMBERS[value_type]
      start, self.pos = self.pos, self.pos + dtype.itemsize
      return np.frombuffer(self._buf, dtype, 1, start)[0].item() if decode else None
    raise ValueError(f"unknown GGUF value type {value_type}")
