"""Where client-update tasks run: the flow's own thread pool, or a Ray cluster through prefect-ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from fedmef_core.config import ExperimentConfig
from fedmef_core.cpu import worker_environment
from fedmef_core.errors import UserError

Submit = Callable[[Any, dict[str, Any]], Any]  # (task, parameters) -> PrefectFuture


class _Finished:
    """A task run called in this thread (retries included), shaped like the future `submit` returns."""

    def __init__(self, task: Any, parameters: dict[str, Any]):
        self._value, self._error = None, None
        try:
            self._value = task(**parameters)
        except Exception as exc:  # noqa: BLE001 - handed to whoever asks for the result, like a future
            self._error = exc

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def _run_here(task: Any, parameters: dict[str, Any]) -> _Finished:
    # torch trains about 20% slower in a pool thread than in the main thread (measured
    # on CPU with the default experiment), so a single worker runs the task right here
    return _Finished(task, parameters)


def runs_in_this_thread(config: ExperimentConfig) -> bool:
    """Whether client tasks run one at a time in the flow's own thread (local runner, one worker)."""
    return config.runtime.runner == "local" and config.runtime.workers == 1


def temporary_api_url() -> str | None:
    """The address of the temporary Prefect server this process runs flows against, or None when a server
    is configured (``PREFECT_API_URL``; Ray's workers then read the same setting).

    A worker of a local Ray cluster that finds no server configured would start a temporary server of its
    own for its task runs (seconds of start-up and a core's share per worker) and record them there, out of
    the flow run's sight; given this address, it reports to the flow's server."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    run = FlowRunContext.get()
    if PREFECT_API_URL.value() or run is None:
        return None
    return str(run.client.api_url)


@contextmanager
def task_runner(config: ExperimentConfig) -> Iterator[Submit]:
    """Yield a `submit(task, parameters)` for `runtime.runner`."""
    if config.runtime.runner == "local":
        if runs_in_this_thread(config):
            yield _run_here  # one at a time: the flow's own thread, where torch runs fastest
        else:
            yield lambda task, parameters: task.submit(**parameters)
        return
    try:
        from prefect_ray import RayTaskRunner
        from prefect_ray.context import remote_options
    except ImportError:
        raise UserError(
            "runtime.runner is 'ray' but prefect-ray is not installed: pip install -e '.[distributed]'"
        ) from None
    ray = config.ray
    # the workers compute as this process does (fedmef_core.cpu: wait policy, portable numerics)
    env_vars = worker_environment()
    init_kwargs: dict[str, Any] = {"include_dashboard": False}
    if ray.address is None:
        if ray.local_cpus is not None:
            init_kwargs["num_cpus"] = ray.local_cpus
        if api_url := temporary_api_url():
            env_vars["PREFECT_API_URL"] = api_url
    init_kwargs["runtime_env"] = {"env_vars": env_vars}
    runner = RayTaskRunner(address=ray.address, init_kwargs=init_kwargs)
    with ExitStack() as stack:
        try:
            stack.enter_context(runner)
        except ConnectionError:  # ray.init gave up (about 20 s of retries)
            if ray.address is None:
                raise
            raise UserError(cannot_connect(ray.address)) from None

        def submit(task, parameters: dict[str, Any]):
            # max_retries=0: Ray would re-run a task whose worker or node died under the same Prefect task
            # run, behind the flow's back; the flow submits the wave again instead, as a new task run,
            # counted against runtime.client_retries (tasks.clients.ClientUpdates)
            with remote_options(num_cpus=ray.num_cpus, num_gpus=ray.num_gpus, max_retries=0):
                return runner.submit(task, parameters=parameters)

        yield submit


def cannot_connect(address: str) -> str:
    return (
        f"cannot connect to the Ray cluster at {address} (ray.address). Check that its head node is up (`ray start "
        "--head`) and reachable from here. If the log above says InvalidAuthToken, the cluster uses token "
        "authentication (`ray start --head` turns it on when it finds a token, e.g. the ~/.ray/auth_token that any "
        "local `ray.init()` writes): set RAY_AUTH_MODE=token here, with the cluster's token in RAY_AUTH_TOKEN or "
        "~/.ray/auth_token"
    )


def mark_crashed(future: Any, message: str) -> None:
    """Mark the task run of a future that was lost (its Ray worker or node died) Crashed: nothing else would,
    and the Prefect UI would show it Running for ever. Best effort: the server may be unreachable too."""
    task_run_id = getattr(future, "task_run_id", None)
    if task_run_id is None:
        return
    from prefect import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_task_run(task_run_id).state
            if state is None or not state.is_final():
                client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception:  # noqa: BLE001, S110 - the round goes on; the task run's state is cosmetic
        pass
