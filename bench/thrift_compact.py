"""A schema-less Thrift compact-protocol codec: just enough to rewrite a Parquet footer.

Prototype for docs/scaling.md (bench/stitch.py). A struct decodes to a list of
`Field(id, type, value)` in wire order and encodes back to the same bytes, so a footer can
be decoded, have a few offsets changed, and be re-encoded as Arrow's writer would.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


@dataclass
class Field:
    """One field of a struct: its id, its compact type and its decoded value."""

    id: int
    type: int
    value: Any


@dataclass
class Container:
    """A list or set: the element type and the elements (bools as their wire byte)."""

    elem: int
    items: list[Any]


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


class Reader:
    """Decodes compact-protocol values from a buffer, from `pos` on."""

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf, self.pos = memoryview(buf), pos

    def varint(self) -> int:
        """An unsigned LEB128 varint."""
        shift = out = 0
        while True:
            b = self.buf[self.pos]
            self.pos += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7

    def value(self, ttype: int) -> Any:
        """One value of a compact type (outside a field header)."""
        if ttype in (TRUE, FALSE, BYTE):  # in containers a bool is one byte (1 or 2)
            b = self.buf[self.pos]
            self.pos += 1
            return b
        if ttype in (I16, I32, I64):
            return _unzigzag(self.varint())
        if ttype == DOUBLE:
            (d,) = struct.unpack_from("<d", self.buf, self.pos)
            self.pos += 8
            return d
        if ttype == BINARY:
            n = self.varint()
            self.pos += n
            return bytes(self.buf[self.pos - n : self.pos])
        if ttype in (LIST, SET):
            head = self.buf[self.pos]
            self.pos += 1
            size = head >> 4 if head >> 4 != 15 else self.varint()
            elem = head & 0x0F
            return Container(elem, [self.value(elem) for _ in range(size)])
        if ttype == STRUCT:
            return self.struct()
        raise ValueError(f"unsupported compact type {ttype} at {self.pos}")

    def struct(self) -> list[Field]:
        """A struct's fields up to its stop byte."""
        fields: list[Field] = []
        last = 0
        while True:
            head = self.buf[self.pos]
            self.pos += 1
            if head == STOP:
                return fields
            ttype, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else _unzigzag(self.varint())
            if ttype in (TRUE, FALSE):
                value: Any = ttype == TRUE
            else:
                value = self.value(ttype)
            fields.append(Field(fid, ttype, value))
            last = fid


class Writer:
    """Encodes compact-protocol values the way the Thrift C++ library does."""

    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        """An unsigned LEB128 varint."""
        while n >= 0x80:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def value(self, ttype: int, v: Any) -> None:
        """One value of a compact type (outside a field header)."""
        if ttype in (TRUE, FALSE, BYTE):
            self.out.append(v & 0xFF)
        elif ttype in (I16, I32, I64):
            self.varint(_zigzag(v))
        elif ttype == DOUBLE:
            self.out += struct.pack("<d", v)
        elif ttype == BINARY:
            self.varint(len(v))
            self.out += v
        elif ttype in (LIST, SET):
            n = len(v.items)
            if n < 15:
                self.out.append(n << 4 | v.elem)
            else:
                self.out.append(0xF0 | v.elem)
                self.varint(n)
            for item in v.items:
                self.value(v.elem, item)
        elif ttype == STRUCT:
            self.struct(v)
        else:
            raise ValueError(f"unsupported compact type {ttype}")

    def struct(self, fields: list[Field]) -> None:
        """A struct's fields and its stop byte."""
        last = 0
        for f in fields:
            ttype = (TRUE if f.value else FALSE) if f.type in (TRUE, FALSE) else f.type
            if 0 < f.id - last <= 15:
                self.out.append((f.id - last) << 4 | ttype)
            else:
                self.out.append(ttype)
                self.varint(_zigzag(f.id))
            if f.type not in (TRUE, FALSE):
                self.value(f.type, f.value)
            last = f.id
        self.out.append(STOP)


def decode_struct(buf: bytes | memoryview, pos: int = 0) -> tuple[list[Field], int]:
    """The struct at `pos` and the position after it."""
    r = Reader(buf, pos)
    return r.struct(), r.pos


def encode_struct(fields: list[Field]) -> bytes:
    """The compact encoding of a struct."""
    w = Writer()
    w.struct(fields)
    return bytes(w.out)


def get(fields: list[Field], fid: int) -> Field | None:
    """The field with id `fid`, or None."""
    return next((f for f in fields if f.id == fid), None)
