"""Reading blobs in the format the Firestore store wrote before Arrow IPC (never written any more).

Such a blob is zlib over: a header (magic, record count, byte length of the id block), the
ids' lengths in code points as u32, the ids as one UTF-8 block, a flag byte per journal
entry (1 put, 0 delete), then raw and payload as u64 arrays; every number little-endian.
Shards keep this format until a compaction rewrites them, so it stays readable; its
fixtures are in tests/state/legacy_firestore_blobs.
"""

from __future__ import annotations

import itertools
import struct
import sys
import zlib
from array import array
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc

_HEADER: Final = struct.Struct("<4sII")
# (namespace key, is a journal) -> the magic the blob starts with.
_MAGIC: Final = {
    ("fp", False): b"CFS1",
    ("fp", True): b"CFJ1",
    ("intents", False): b"CIS1",
    ("intents", True): b"CIJ1",
}


class LegacyBlobError(ValueError):
    """The blob is not a well-formed legacy blob of the expected kind."""


def decode(blob: bytes, namespace: str, *, journal: bool, where: str) -> pa.Table:
    """The blob's columns: ``custom_id``, then ``put`` for a journal, then ``raw``, ``payload`` for fingerprints."""
    magic = _MAGIC[(namespace, journal)]
    with_values = namespace == "fp"
    try:
        body = zlib.decompress(blob)
        found, count, id_bytes = _HEADER.unpack_from(body, 0)
    except (zlib.error, struct.error) as exc:
        raise LegacyBlobError(f"{where}: state blob cannot be decoded ({exc})") from exc
    if found != magic:
        raise LegacyBlobError(f"{where}: state blob has format {found!r}, expected {magic!r}")
    expected = _HEADER.size + 4 * count + id_bytes + (count if journal else 0) + (16 * count if with_values else 0)
    if len(body) != expected:
        raise LegacyBlobError(f"{where}: state blob is {len(body)} bytes, expected {expected}")

    buffer = pa.py_buffer(body)
    offset = _HEADER.size
    lengths = _little_endian(pa.uint32(), "I", buffer.slice(offset, 4 * count), count)
    offset += 4 * count
    columns = {"custom_id": _ids(lengths, buffer.slice(offset, id_bytes), count)}
    offset += id_bytes
    if journal:
        flags = pa.Array.from_buffers(pa.uint8(), count, [None, buffer.slice(offset, count)])
        columns["put"] = flags.cast(pa.bool_())
        offset += count
    if with_values:
        columns["raw"] = _little_endian(pa.uint64(), "Q", buffer.slice(offset, 8 * count), count)
        columns["payload"] = _little_endian(pa.uint64(), "Q", buffer.slice(offset + 8 * count, 8 * count), count)
    order = [name for name in ("custom_id", "raw", "payload", "put") if name in columns]
    return pa.table([columns[name] for name in order], names=order)


def _little_endian(arrow_type: pa.DataType, typecode: str, data: pa.Buffer, count: int) -> pa.Array:
    """Stored little-endian numbers as an Arrow array (over the blob's own bytes where the host is too)."""
    if sys.byteorder == "big":  # pragma: no cover - every host we deploy on is little-endian
        values = array(typecode, data.to_pybytes())
        values.byteswap()
        return pa.array(values.tolist(), arrow_type)
    return pa.Array.from_buffers(arrow_type, count, [None, data])


def _ids(lengths: pa.Array, id_block: pa.Buffer, count: int) -> pa.Array:
    if count and pc.sum(lengths).as_py() == id_block.size:
        # Lengths are in code points; when they add up to the byte count every id is ASCII,
        # so they are byte lengths too and become Arrow offsets as they are.
        ends = pc.cumulative_sum(lengths.cast(pa.int64())).cast(pa.int32())
        offsets = pa.concat_arrays([pa.array([0], pa.int32()), ends])
        return pa.Array.from_buffers(pa.string(), count, [None, offsets.buffers()[1], id_block])
    text = id_block.to_pybytes().decode("utf-8")
    bounds = list(itertools.accumulate(lengths.to_pylist()))
    return pa.array([text[a:b] for a, b in zip([0, *bounds[:-1]], bounds, strict=True)], pa.string())
