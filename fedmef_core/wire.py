"""Typed records that cross a process boundary or go into a checkpoint as plain dicts.

A :class:`Record` is a dataclass whose fields a reader finds by name. Checkpoints and exchange files are
read with ``torch.load(weights_only=True)``, and Prefect and Ray hand over plain values, so
:meth:`Record.to_wire` turns one into a dict of tensors, lists, numbers and strings (a field left out when it
holds ``None``, its default) and :meth:`Record.from_wire` turns it back. A field that holds another record (a
client's upload, a round's payload: their class varies by method), also inside a list or a dict, is written
with its class's name beside its fields and read back as that class, so any record class defined at module level
travels, the ones of a method added in its own module included (the reader must have imported that module).
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
        """The fields as a plain dict (a ``None`` that is the field's default left out), nested records (in lists
        and dicts too) tagged with their class."""
        if "__dataclass_fields__" not in type(self).__dict__:  # an undecorated subclass would lose its fields
            raise TypeError(f"{_name(type(self))} is a Record but not a @dataclass of its own: decorate it")
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: _write(value) for f in fields
                if (value := getattr(self, f.name)) is not None or f.default is not None}  # None: its default

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Self:
        """The record that :meth:`to_wire` wrote."""
        return cls(**{k: _read(v) for k, v in wire.items()})


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _write(value: Any) -> Any:
    """`value` as plain data: a record as its tagged fields, also inside lists, tuples and dicts."""
    if isinstance(value, Record):
        return {TAG: _name(type(value)), **value.to_wire()}
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_write(v) for v in value)
    return value


def _read(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return type(value)(_read(v) for v in value)
    if not isinstance(value, dict):
        return value
    if TAG not in value:
        return {k: _read(v) for k, v in value.items()}
    fields = dict(value)
    name = fields.pop(TAG)
    try:
        cls = Record._classes[name]
    except KeyError:
        raise ValueError(f"unknown record class {name!r}: import the module that defines it") from None
    return cls.from_wire(fields)
