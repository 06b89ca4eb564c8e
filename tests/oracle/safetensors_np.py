"""Minimal safetensors reader/writer on numpy (struct + json), for the test oracles.

Format: 8-byte little-endian header length N, N bytes of JSON
{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian data; offsets are relative to the start of the data.
BF16 has no numpy dtype: it is read as uint16 bit patterns (see bf16_to_f32).
"""
import json
import struct

import numpy as np

DTYPES = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U8": np.dtype("u1"),
}
_NAME_OF = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i4"): "I32", np.dtype("<i8"): "I64",
            np.dtype("<u2"): "U16", np.dtype("<u4"): "U32", np.dtype("u1"): "U8"}


class FormatError(ValueError):
    pass


def read(path):
    """Returns (tensors, metadata): tensors an insertion-ordered dict name -> np.ndarray (file order)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise FormatError(f"{path}: {len(raw)} bytes, expected at least 8")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise FormatError(f"{path}: header length {n} exceeds the {len(raw) - 8} bytes after it")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    spans = []
    for name, e in header.items():
        try:
            dt = DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise FormatError(f"{path}: tensor {name!r}: bad entry {e!r} ({ex})") from None
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= b <= end <= len(data) or count * dt.itemsize != end - b:
            raise FormatError(f"{path}: tensor {name!r}: shape {list(shape)} {e['dtype']} does not fit "
                              f"data_offsets [{b}, {end}] of {len(data)} data bytes")
        tensors[name] = np.frombuffer(data, dtype=dt, count=count, offset=b).reshape(shape).copy()
        spans.append((b, end, name))
    pos = 0
    for b, end, name in sorted(spans):
        if b != pos:
            raise FormatError(f"{path}: tensor {name!r} at [{b}, {end}] overlaps or leaves a gap (expected {pos})")
        pos = end
    if pos != len(data):
        raise FormatError(f"{path}: tensors cover {pos} data bytes, file holds {len(data)}")
    return tensors, meta


def write(path, tensors, metadata=None):
    """Writes an ordered mapping name -> np.ndarray (F32/F64/I32/I64/U16/U32/U8), padded header."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    off = 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder not in ("|",) else a.dtype
        if dt not in _NAME_OF:
            raise FormatError(f"{path}: tensor {name!r}: unsupported numpy dtype {a.dtype}")
        b = a.astype(dt, copy=False).tobytes()
        header[name] = {"dtype": _NAME_OF[dt], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def bf16_to_f32(bits):
    """uint16 bf16 bit patterns -> float32 values."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)
