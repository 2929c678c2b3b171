"""Partition flow: split the training set among the clients."""

from __future__ import annotations

from prefect import flow

from fedmef_core.config import ExperimentConfig
from flows import cli
from flows.cli import fails_cleanly
from tasks import preflight
from tasks.partitioning import partition_dataset


@flow(name="partition", log_prints=True)
@fails_cleanly
def partition_flow(config: ExperimentConfig = ExperimentConfig()) -> dict:
    """Split the dataset into per-client shards (indices, statistics and a heat map)."""
    summary = partition_dataset(config)
    print(
        f"partitioned {summary['dataset']} among {summary['num_clients']} clients ({summary['scheme']}): "
        f"{summary['min_size']}-{summary['max_size']} samples each, "
        f"mean label entropy {summary['mean_label_entropy']:.3f}"
    )
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """`python -m flows.partition` or `fedmef partition` [--params FILE] [--set section.key=value ...]."""
    return cli.main(partition_flow, preflight.for_partition, argv, prog)


if __name__ == "__main__":
    main()
