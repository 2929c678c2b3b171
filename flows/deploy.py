"""Deploy every flow to a process work pool, for Prefect workers on other machines (GPU machines):

    python -m flows.deploy [--pool fedmef-gpu] [--limit N] [--workdir DIR] [--params FILE] [--set k=v ...]

Needs a Prefect server (`PREFECT_API_URL`). Creates the process work pool if it is missing (`--limit`: at most N
flow runs at once in the whole pool; given again, it changes an existing pool's limit) and puts in it the
deployments `flows.serve` serves (`flows.deployments`: same forms and defaults), named after the pool:
`train/fedmef-gpu`, `sweep/fedmef-gpu`, ... Nothing is built or uploaded: a worker imports the flows from the
fedmef installed beside it (module entrypoints, `flows.train.train_flow`) and starts each flow run in `--workdir`
(default: this folder), where relative outputs (`runs/`, `data/partitions`, `sqlite:///mlflow.db`) land.

On each GPU machine: `prefect worker start --pool fedmef-gpu --limit 1` (the worker's limit: experiments at once on
that GPU; one worker per GPU with `CUDA_VISIBLE_DEVICES` on a machine with several).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmef_core.config import ExperimentConfig
from fedmef_core.errors import UserError
from flows.cli import config_from, config_parser
from flows.deployments import deployments

POOL = "fedmef-gpu"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of flow runs, at least 1 (got {text!r})")
    return int(text)


def ensure_pool(client, name: str, limit: int | None):
    """The process work pool `name`, created if missing; `limit` (if given) becomes its concurrency limit."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        return client.create_work_pool(WorkPoolCreate(
            name=name, type=ProcessWorker.type, concurrency_limit=limit,
            base_job_template=ProcessWorker.get_default_base_job_template(),
            description="fedmef experiments: `prefect worker start --pool <this pool> --limit 1` on each GPU",
        ))
    if pool.type != ProcessWorker.type:
        raise UserError(f"work pool {name!r} exists but is of type {pool.type!r}; the flows run from the "
                        "installed code in processes: give a process pool (--pool NAME, created if missing)")
    if limit is not None and pool.concurrency_limit != limit:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
        pool = client.read_work_pool(name)
    return pool


def deploy_to_pool(config: ExperimentConfig, pool: str, limit: int | None, workdir: Path) -> list[str]:
    """Create or update the pool and the deployments in it; returns their names (`flow/pool`)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("no Prefect server to deploy to: start one (`prefect server start`) and set "
                        "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        if (down := client.api_healthcheck()) is not None:
            raise UserError(f"cannot reach the Prefect server at {url} ({down}); start it or fix PREFECT_API_URL")
        try:
            work_pool = ensure_pool(client, pool, limit)
        except (PrefectHTTPStatusError, ValueError) as exc:  # a name the server or its schema refuses
            raise UserError(f"cannot create work pool {pool!r}: {exc}") from None
    try:
        workdir.mkdir(parents=True, exist_ok=True)  # here; on other worker machines it must exist already
    except OSError as exc:
        raise UserError(f"cannot create the work folder --workdir {workdir}: {exc.strerror}") from None
    deps = deployments(config, name=pool, entrypoint_type=EntrypointType.MODULE_PATH,
                       job_variables={"working_dir": str(workdir)})
    for dep in deps:  # what `prefect.deploy` does once its checks pass; in 3.8.8 its check that lists the pool's
        dep.apply(work_pool_name=pool)  # workers sends null paging that the server refuses (422)
    names = [f"{d.flow_name}/{d.name}" for d in deps]
    limit = work_pool.concurrency_limit
    at_once = "no limit on flow runs at once" if limit is None else f"at most {limit} flow runs at once"
    print(f"deployed {', '.join(names)} to work pool {pool!r} (process; {at_once}; "
          f"runs start in {workdir})\nserve it on each GPU machine: prefect worker start --pool {pool} --limit 1")
    return names


def main(argv: list[str] | None = None, prog: str | None = None) -> list[str]:
    """The CLI: a bad config, no reachable server or a pool of another type is one line and exit status 2."""
    parser = config_parser("Deploy every fedmef flow to a process work pool served by Prefect workers.", prog)
    parser.add_argument("--pool", default=POOL, help=f"work pool, created if missing (default: {POOL})")
    parser.add_argument("--limit", type=_positive, default=None, metavar="N",
                        help="at most N flow runs at once in the whole pool (default: a new pool has no limit, "
                             "an existing one keeps its own)")
    parser.add_argument("--workdir", default=".", metavar="DIR",
                        help="folder on the worker machines where flow runs start (default: this folder, as an "
                             "absolute path; the same path on every worker)")
    try:
        args = parser.parse_args(argv)
        return deploy_to_pool(config_from(args), args.pool, args.limit, Path(args.workdir).resolve())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
