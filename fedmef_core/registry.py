"""What a config can choose: the federated methods, the model architectures and the datasets, one entry each.

A new method is its module in `fedmef_core/algorithms/` plus one entry in `METHODS`; a new architecture is its
builder plus one entry in `ARCHITECTURES`; a new dataset is its loader plus one entry in `DATASETS`. The config's
choices (`pruning.method`, `model.arch`, `data.name`), their validation
and the drop-downs of the Prefect form all read these registries when they run, so an entry added later —
`register_method` from another package or a test — is a valid choice at once, and nothing else changes.

This module is light on purpose (the standard library and pydantic): the config reads it, and the code that
runs a method or loads a dataset — torch, and the config itself — is imported only when it is needed, from the
`"module:attribute"` path its entry names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

T = TypeVar("T")


def load_object(target: str | Any) -> Any:
    """The object a `"package.module:attribute"` path names (imported now); any other object as it is."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Entries by name, in the order they were added."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "method", "dataset": named in messages
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if self._entries.get(name, entry) is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered already; choose another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget `name` (a plug-in or a test undoing its registration)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def describe(self) -> str:
        """The names as a message lists them: 'a', 'b' or 'c'."""
        quoted = [repr(n) for n in self._entries]
        return " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else "".join(quoted)

    def get(self, name: str) -> T | None:
        return self._entries.get(name)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.describe()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class OneOf:
    """A pydantic annotation: the value is a name in `registry` when validated, and the JSON schema (the Prefect
    form's drop-down) lists the names registered when the schema is made. `Annotated[str, OneOf(METHODS)]`."""

    registry: Registry[Any]

    def _validate(self, value: Any) -> str:
        if isinstance(value, str) and value in self.registry:
            return value
        raise PydanticCustomError(
            "unknown_choice", "Input should be a registered {kind}: {names}",
            {"kind": self.registry.kind, "names": self.registry.describe()},
        )

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        string = core_schema.str_schema()
        return core_schema.no_info_plain_validator_function(self._validate, json_schema_input_schema=string)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        return {**handler(schema), "enum": list(self.registry.names())}


# --- methods ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodTraits:
    """What a method declares about itself; config resolution, validation and reports ask these."""

    sparse: bool = False  # trains a masked model at `pruning.density` (else dense: density 1.0)
    norm: str = "batch"  # what `model.norm: auto` means for it
    sap: bool = False  # what `sap.enabled: null` means for it
    selects_initial_mask: bool = False  # supports FedTiny's adaptive BN selection (`pruning.bn_select`)


@dataclass(frozen=True)
class Method:
    """A registry entry: the algorithm class (or its `"module:Class"` path, imported when built) and its traits."""

    algorithm: str | type
    traits: MethodTraits = MethodTraits()

    def load(self) -> type:
        return load_object(self.algorithm)


METHODS: Registry[Method] = Registry("method")


def register_method(name: str, algorithm: str | type | None = None, traits: MethodTraits = MethodTraits()):
    """Register `algorithm` (a `FederatedAlgorithm` subclass or its `"module:Class"` path) as `pruning.method:
    name`. Without `algorithm`, a class decorator: `@register_method("mine", traits=MethodTraits(sparse=True))`."""
    if algorithm is None:
        def decorate(cls: type) -> type:
            register_method(name, cls, traits)
            return cls
        return decorate
    return METHODS.add(name, Method(algorithm, traits))


def method_traits(name: str) -> MethodTraits | None:
    """What method `name` declares about itself, or None if no such method is registered."""
    entry = METHODS.get(name)
    return None if entry is None else entry.traits


_ALGORITHMS = "fedmef_core.algorithms"
register_method("fedavg", f"{_ALGORITHMS}.base:FederatedAlgorithm")  # dense FedAvg
register_method("fedavg_static", f"{_ALGORITHMS}.static:MaskedAlgorithm", MethodTraits(sparse=True))
register_method("prunefl", f"{_ALGORITHMS}.prunefl:PruneFL", MethodTraits(sparse=True))
register_method("feddst", f"{_ALGORITHMS}.feddst:FedDST", MethodTraits(sparse=True))
register_method("fedtiny", f"{_ALGORITHMS}.fedtiny:FedTiny", MethodTraits(sparse=True, selects_initial_mask=True))
register_method("fedmef", f"{_ALGORITHMS}.fedmef:FedMef",  # the paper's method: NSConv and SAP
                MethodTraits(sparse=True, norm="nsconv", sap=True, selects_initial_mask=True))


# --- architectures ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """A registry entry: the model builder, ``builder(in_channels, num_classes, image_size, norm_factory) ->
    nn.Module`` (`fedmef_core.models`), or its `"module:function"` path, imported when built."""

    builder: str | Callable[..., Any]

    def load(self) -> Callable[..., Any]:
        return load_object(self.builder)


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(name: str, builder: str | Callable[..., Any]) -> Architecture:
    """Register `builder` as `model.arch: name`."""
    return ARCHITECTURES.add(name, Architecture(builder))


_MODELS = "fedmef_core.models"
register_architecture("cnn", f"{_MODELS}.cnn:cnn")
register_architecture("resnet8", f"{_MODELS}.resnet:resnet8")  # the ResNet family at CPU size
register_architecture("resnet18", f"{_MODELS}.resnet:resnet18")
register_architecture("mobilenetv2", f"{_MODELS}.mobilenet:mobilenetv2")


# --- datasets --------------------------------------------------------------------------------------------

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Dataset:
    """A registry entry: how to load the dataset and what its images are, known without loading them.

    `loader(entry, root) -> (train, test)` (`fedmef_core.data.ImageData`s), or its `"module:function"` path.
    """

    loader: str | Callable[..., Any]
    channels: int
    size: int  # height = width, as decoded
    classes: int
    stats: Stats | None = None  # per-channel (mean, std) of the training set, [0, 1] units; None: computed
    torchvision: str | None = None  # the torchvision.datasets class, for loaders that use it
    layout: str | None = None  # where a user places a dataset torchvision cannot download (messages name it)
    env: tuple[str, ...] = ()  # environment variables the loader reads (a cached load is per their values)

    def load(self) -> Callable[..., Any]:
        return load_object(self.loader)


DATASETS: Registry[Dataset] = Registry("dataset")


def register_dataset(name: str, entry: Dataset) -> Dataset:
    """Register `entry` as `data.name: name`."""
    return DATASETS.add(name, entry)


FASHION_MNIST_ENV = "FEDMEF_FASHION_MNIST_DIR"  # a folder of Fashion-MNIST's gzipped IDX files
_DATA = "fedmef_core.data.datasets"
register_dataset("fashion_mnist", Dataset(
    f"{_DATA}:fashion_mnist", 1, 28, 10, ((0.2860,), (0.3530,)), torchvision="FashionMNIST", env=(FASHION_MNIST_ENV,)))
register_dataset("mnist", Dataset(f"{_DATA}:from_torchvision", 1, 28, 10, ((0.1307,), (0.3081,)), "MNIST"))
register_dataset("cifar10", Dataset(
    f"{_DATA}:from_torchvision", 3, 32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "CIFAR10"))
register_dataset("cifar100", Dataset(
    f"{_DATA}:from_torchvision", 3, 32, 100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), "CIFAR100"))
register_dataset("cinic10", Dataset(
    f"{_DATA}:cinic10", 3, 32, 10,
    layout="<root>/cinic10/train/<class>/*.png and <root>/cinic10/test/<class>/*.png (the CINIC-10 archive from "
    "https://datashare.ed.ac.uk/handle/10283/3192, extracted into <root>/cinic10)"))
register_dataset("tinyimagenet", Dataset(
    f"{_DATA}:tinyimagenet", 3, 64, 200,
    layout="<root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG, <root>/tiny-imagenet-200/val/images/*.JPEG and "
    "<root>/tiny-imagenet-200/val/val_annotations.txt (http://cs231n.stanford.edu/tiny-imagenet-200.zip, extracted "
    "into <root>)"))
