"""Datasets in memory, mini-batches from them, and client partitions."""

from fedmef_core.data.batches import iterate_batches
from fedmef_core.data.datasets import DatasetUnavailable, ImageData, image_shape, load_dataset
from fedmef_core.data.partition import (
    PartitionError,
    load_partition,
    partition_digest,
    partition_indices,
    partition_origin,
    partition_stats,
    save_partition,
    split_digest,
    write_partition,
)

__all__ = [
    "DatasetUnavailable",
    "ImageData",
    "image_shape",
    "PartitionError",
    "iterate_batches",
    "load_dataset",
    "load_partition",
    "partition_digest",
    "partition_indices",
    "partition_origin",
    "partition_stats",
    "save_partition",
    "split_digest",
    "write_partition",
]
