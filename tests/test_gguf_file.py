"""gguf_file against the gguf package's own reader, on files its writer makes."""

import gguf
import numpy as np
import pytest

from score_jax.models import gguf_file


def _write(path, fill, tensors=()):
  writer = gguf.GGUFWriter(str(path), arch="llama")
  fill(writer)
  for name, array, qtype in tensors:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      writer.add_tensor(name, array.astype(np.float32 if qtype == 0 else np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _metadata(w):
  w.add_uint32("t.u32", 7)
  w.add_int8("t.i8", -3)
  w.add_float32("t.f32", 0.5)
  w.add_bool("t.bool", True)
  w.add_string("t.str", "héllo ▁")
  w.add_array("t.ints", [1, 2, 3])
  w.add_array("t.floats", [0.25, -1.0])
  w.add_array("t.strs", ["a", " b", ""])


def test_read_metadata_matches_gguf_reader(tmp_path):
  path = _write(tmp_path / "t.gguf", _metadata)
  ours = gguf_file.read_metadata(path)
  ref = gguf.GGUFReader(path)
  keys = [k for k in ref.fields if not k.startswith("GGUF.")]
  assert sorted(ours) == sorted(keys)
  for key in keys:
    value = ours[key]
    value = value.tolist() if isinstance(value, np.ndarray) else value
    assert value == ref.fields[key].contents()
  assert gguf_file.read_metadata(path, {"t.strs", "t.bool"}) == {
      "t.strs": ["a", " b", ""], "t.bool": True}


def test_read_tensors_match_gguf_reader(tmp_path):
  rng = np.random.default_rng(0)
  q = gguf.GGMLQuantizationType
  tensors = [("a.f32", rng.normal(size=(3, 5)), q.F32), ("b.f16", rng.normal(size=(7,)), q.F16),
             ("c.q8", rng.normal(size=(4, 64)), q.Q8_0),
             ("d.q4", rng.normal(size=(2, 64)), q.Q4_0),
             ("e.f32", rng.normal(size=(2, 3, 4)), q.F32)]
  tensors = [(n, a.astype(np.float32), t) for n, a, t in tensors]
  path = _write(tmp_path / "t.gguf", _metadata, tensors)
  metadata, ours = gguf_file.read(path)
  assert metadata["t.str"] == "héllo ▁"
  ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
  assert list(ours) == [n for n, _, _ in tensors]
  for name, array, qtype in tensors:
    want = gguf.quants.dequantize(ref[name].data, ref[name].tensor_type).reshape(array.shape)
    got = ours[name].dequantize()
    assert ours[name].qtype == qtype and got.shape == array.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, array, atol=0.3)  # Quantization error, not garbage.
    # Not a view of the file's memory map (which would keep it alive and resident).
    assert not np.shares_memory(got, ours[name].data)


def test_rejects_other_and_cut_files(tmp_path):
  (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a GGUF file"):
    gguf_file.read_metadata(tmp_path / "x.gguf")
  (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x00")
  with pytest.raises(ValueError, match="bad GGUF file"):
    gguf_file.read_metadata(tmp_path / "cut.gguf")
  whole = _write(tmp_path / "w.gguf", _metadata,
                 [("a", np.ones((64, 64), np.float32), gguf.GGMLQuantizationType.F32)])
  (tmp_path / "short.gguf").write_bytes(whole.read_bytes()[:-100])
  with pytest.raises(ValueError, match="bad GGUF file.*past the end"):
    gguf_file.read(tmp_path / "short.gguf")
