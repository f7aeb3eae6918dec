"""Changed-attribute sending: per-attribute hashes, and bodies of only the attributes that changed.

An activation with ``send: changed_attributes`` (docs/changed-attributes.md) sends a changed
profile with only the attributes whose value moved since Batch's last acknowledgement, so
that what the app's SDK writes to the other attributes (``$language``, a custom attribute set
in the app) is not overwritten by an unchanged warehouse value. To know which moved, the
state keeps, beside the payload fingerprint, the **attribute set** of the acknowledged
payload: one 32-bit hash per attribute, of its fragment ``,"key":value`` as the encoder
writes it (:mod:`sync.encode`), sorted and packed, 4 little-endian bytes each (``attributes``
of :data:`sync.differ.FINGERPRINT_SCHEMA`).

* **Membership, not position.** An attribute is unchanged when its hash is in the stored
  set. The key is in the hash (``date(x)`` included), so the set needs no key order and no
  mapping version: after a mapping change, the attributes that kept their key and value are
  still found, and only the new or changed ones are sent.
* **The payload fingerprint stays the arbiter.** A row is looked at here only when its
  64-bit payload fingerprint moved (and it is not new, not in a full pass, not
  unconfirmed). The stored set then says which attributes to send.
* **Collisions are caught where they would be silent.** A changed attribute is missed only
  if its new hash is in the stored set. Every attribute that did not change matches its own
  entry, so a new hash equal to such an entry shows as two attributes on one entry; and
  when the payload has as many attributes as the stored set (no mapping change), a single
  changed attribute whose new hash equals its old one shows as "nothing changed" while the
  payload moved. Either way the row is sent whole. What is left is a new hash equal to the
  old entry of an attribute that itself changed or left: at most ``c·(c + r) / 2³²`` for a
  profile with ``c`` attributes changed and ``r`` gone, and none when one attribute changed
  and none came or went (docs/changed-attributes.md gives the figures).
* **Nothing held that Batch does not hold.** The set is of the body Batch acknowledged:
  an attribute dropped under ``drop_attribute`` is left out of it, since Batch keeps its old
  value, which the set then does not claim to know (it is sent once its value is valid).

Everything is in Arrow columns: the hashes are taken once per distinct fragment of a batch,
and a row is never a Python object, changed or not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from sync.differ import HASH_BYTES
from sync.encode import EncodedBatch, join_objects

# Salts every attribute hash: a change of the recipe must change every hash (a resend of
# each changed profile whole, once), never match an old one by accident.
ATTRIBUTE_SALT: Final = b"cepsync/attribute/1|"
_SHIFT: Final = 1 << 32


class AttributeColumns(NamedTuple):
    """The attributes of one encoded batch, in columns.

    Attributes:
        slots: The body's fragments, as (key they sort by, fragment per row; "" where absent).
        hashes: Per slot, the fragment's 32-bit hash per row; null where the row has none.
        sets: Per row, its sorted hashes packed (what the state keeps once Batch acknowledged).
    """

    slots: Sequence[tuple[str, pa.StringArray]]
    hashes: Sequence[pa.UInt32Array]
    sets: pa.BinaryArray


class ChangedBodies(NamedTuple):
    """What to send of the rows whose payload moved, against their stored attribute sets.

    Attributes:
        bodies: Per row, the JSON object of only its changed attributes; null to send the
            whole body (no stored set, not a candidate, or a collision to be safe from).
        nothing: Per row, true when the payload moved but every attribute it has is one Batch
            acknowledged (a mapping that dropped an attribute): nothing to send.
    """

    bodies: pa.StringArray
    nothing: pa.BooleanArray


def attribute_columns(encoded: EncodedBatch) -> AttributeColumns:
    """The hashes and packed sets of a batch encoded with ``keep_slots``."""
    if encoded.slots is None:
        raise ValueError("the batch was encoded without its slots (encode_batch(..., keep_slots=True))")
    rows = len(encoded.custom_ids)
    hashes = [fragment_hashes(fragments) for _, fragments in encoded.slots]
    return AttributeColumns(encoded.slots, hashes, pack_sets(hashes, rows))


def fragment_hashes(fragments: pa.StringArray) -> pa.UInt32Array:
    """The 32-bit hash of each fragment (null for ""), computed once per distinct fragment."""
    encoded = pc.dictionary_encode(pc.fill_null(fragments, ""))
    dictionary: pa.StringArray = encoded.dictionary
    salted = hashlib.blake2b(ATTRIBUTE_SALT, digest_size=HASH_BYTES)
    digests: list[bytes] = []
    append = digests.append
    for fragment in dictionary.cast(pa.binary()).to_pylist():
        hasher = salted.copy()
        hasher.update(fragment)
        append(hasher.digest())
    distinct = pa.Array.from_buffers(pa.uint32(), len(dictionary), [None, pa.py_buffer(b"".join(digests))])
    distinct = pc.if_else(pc.not_equal(dictionary, ""), distinct, pa.scalar(None, pa.uint32()))
    hashes: pa.UInt32Array = distinct.take(encoded.indices)
    return hashes


def pack_sets(hashes: Sequence[pa.UInt32Array], rows: int) -> pa.BinaryArray:
    """Per row, its non-null hashes sorted and packed as 4 little-endian bytes each."""
    if not hashes:
        empty: pa.BinaryArray = pa.array([b""] * rows, pa.binary())
        return empty
    row_ids = pa.array(range(rows), pa.int32())
    parts = [pa.table({"row": row_ids, "hash": column}).filter(pc.is_valid(column)) for column in hashes]
    entries = pa.concat_tables(parts).sort_by([("row", "ascending"), ("hash", "ascending")])
    counts = pa.repeat(pa.scalar(0, pa.int32()), rows)
    for column in hashes:
        counts = pc.add(counts, pc.is_valid(column).cast(pa.int32()))
    ends = pc.cumulative_sum(pc.multiply(counts, HASH_BYTES))
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), ends.cast(pa.int32())])
    values = entries.column("hash").combine_chunks()
    data = values.buffers()[1]
    data = pa.py_buffer(b"") if data is None else data.slice(values.offset * HASH_BYTES, len(values) * HASH_BYTES)
    sets: pa.BinaryArray = pa.Array.from_buffers(pa.binary(), rows, [None, offsets.buffers()[1], data])
    return sets


class _Stored(NamedTuple):
    """Stored sets of some rows, unpacked: each entry's hash keyed by its row, and counts."""

    keys: pa.UInt64Array  # row << 32 | hash, one per entry
    starts: pa.Int32Array  # per row, its first entry
    counts: pa.Int32Array  # per row, its entries


def _unpack(sets: pa.BinaryArray) -> _Stored:
    offsets = pa.Array.from_buffers(pa.int32(), len(sets) + 1, [None, sets.buffers()[1]], offset=sets.offset)
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    data = sets.buffers()[2]
    # A copy of the few candidate rows' bytes: aligned for uint32, whatever the buffer's offset.
    raw = b"" if data is None else data.slice(start, end - start).to_pybytes()
    values = pa.Array.from_buffers(pa.uint32(), len(raw) // HASH_BYTES, [None, pa.py_buffer(raw)])
    entry_offsets = pc.shift_right(pc.subtract(offsets, start), 2).cast(pa.int32())
    listed = pa.ListArray.from_arrays(entry_offsets, values)
    rows = pc.list_parent_indices(listed).cast(pa.uint64())
    keys = pc.add(pc.multiply(rows, _SHIFT), values.cast(pa.uint64()))
    counts = pc.shift_right(pc.fill_null(pc.binary_length(sets), 0), 2).cast(pa.int32())
    return _Stored(keys, entry_offsets.slice(0, len(sets)), counts)


def changed_bodies(columns: AttributeColumns, stored: pa.Array, candidates: pa.BooleanArray) -> ChangedBodies:
    """The bodies of only the changed attributes of ``candidates`` rows that have a stored set.

    Args:
        columns: The batch's attributes (:func:`attribute_columns`).
        stored: Per row, the stored attribute set (``STORED_ATTRIBUTES``), null where none.
        candidates: The rows whose payload moved and that would be sent whole otherwise
            (not new, not in a full pass).
    """
    rows = len(candidates)
    usable = pc.and_(pc.fill_null(candidates, False), pc.is_valid(stored))
    picked = pc.indices_nonzero(usable)
    count = len(picked)
    if count == 0:
        return ChangedBodies(pa.nulls(rows, pa.string()), pa.repeat(pa.scalar(False), rows))
    held = _unpack(stored.take(picked).cast(pa.binary()))
    positions = pc.multiply(pa.array(range(count), pa.uint64()), _SHIFT)
    present = changed = pa.repeat(pa.scalar(0, pa.int32()), count)
    keys: list[pa.Array] = []
    fragments: list[tuple[str, pa.StringArray]] = []
    for (key, slot), hashes in zip(columns.slots, columns.hashes, strict=True):
        taken = hashes.take(picked)
        has = pc.is_valid(taken)
        slot_keys = pc.add(positions, pc.fill_null(taken, 0).cast(pa.uint64()))
        moved = pc.and_(has, pc.invert(pc.is_in(slot_keys, value_set=held.keys)))
        present = pc.add(present, has.cast(pa.int32()))
        changed = pc.add(changed, moved.cast(pa.int32()))
        keys.append(slot_keys.filter(has))
        fragments.append((key, pc.if_else(moved, slot.take(picked), "")))
    new_keys = pa.concat_arrays(keys) if keys else pa.array([], pa.uint64())
    # Stored entries no attribute of the new payload matched, per row (a running sum, read at
    # each row's first entry and one past its last).
    lost = pc.invert(pc.is_in(held.keys, value_set=new_keys)).cast(pa.int64())
    running = pa.concat_arrays([pa.array([0], pa.int64()), pc.cumulative_sum(lost).cast(pa.int64())])
    unmatched = pc.subtract(running.take(pc.add(held.starts, held.counts)), running.take(held.starts))
    unmatched = unmatched.cast(pa.int32())
    same_size = pc.equal(present, held.counts)
    # Two attributes on one stored entry; or, with as many attributes as stored, a moved
    # payload where nothing moved, or where what moved and what was lost do not add up.
    doubled = pc.greater(pc.subtract(present, changed), pc.subtract(held.counts, unmatched))
    uneven = pc.and_(same_size, pc.or_(pc.equal(changed, 0), pc.not_equal(changed, unmatched)))
    collision = pc.or_(doubled, uneven)
    partial = pc.and_(pc.greater(changed, 0), pc.invert(collision))
    nothing = pc.and_(pc.equal(changed, 0), pc.invert(collision))
    bodies = pc.if_else(partial, join_objects(fragments, count), pa.scalar(None, pa.string()))
    # Back to the batch's rows: each usable row takes its position among the picked ones.
    where = pc.if_else(usable, pc.subtract(pc.cumulative_sum(usable.cast(pa.int64())), 1), pa.scalar(None, pa.int64()))
    return ChangedBodies(bodies.take(where), pc.fill_null(nothing.take(where), False))
