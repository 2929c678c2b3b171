"""Typed records that cross a process boundary or go into a checkpoint as plain dicts.

A :class:`Record` is a dataclass whose fields a reader finds by name. Checkpoints and exchange files are
read with ``torch.load(weights_only=True)``, and Prefect and Ray hand over plain values, so
:meth:`Record.to_wire` turns one into a dict of tensors, lists, numbers and strings (fields that are
``None`` left out) and :meth:`Record.from_wire` turns it back. A field that holds another record (a
client's upload, a round's payload: their class varies by method) is written with its class's name beside
its fields and read back as that class, so any record class defined at module level travels, the ones of a
method added in its own module included (the reader must have imported that module).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

TAG = "__record__"  # the key naming a nested record's class in its wire dict


class Record:
    """The base of every wire record (subclasses are dataclasses)."""

    _classes: ClassVar[dict[str, type[Record]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Record._classes[_name(cls)] = cls

    def to_wire(self) -> dict[str, Any]:
        """The fields as a plain dict; ``None`` left out, nested records tagged with their class."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = {TAG: _name(type(value)), **value.to_wire()} if isinstance(value, Record) else value
        return out

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        """The record that :meth:`to_wire` wrote."""
        return cls(**{k: _read(v) for k, v in wire.items()})


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _read(value: Any) -> Any:
    if not (isinstance(value, dict) and TAG in value):
        return value
    fields = dict(value)
    name = fields.pop(TAG)
    try:
        cls = Record._classes[name]
    except KeyError:
        raise ValueError(f"unknown record class {name!r}: import the module that defines it") from None
    return cls.from_wire(fields)
