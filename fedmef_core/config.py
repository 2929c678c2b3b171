"""The experiment configuration: one pydantic model, validated once at the edge.

`params.yaml` is exactly the YAML form of :class:`ExperimentConfig`. Everything inside the
library receives these frozen, typed objects — never raw dicts.
"""

from __future__ import annotations

import hashlib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmef_core.errors import UserError
from fedmef_core.names import is_utf8
from fedmef_core.registry import ARCHITECTURES, DATASETS, METHODS, OneOf, method_traits


def _is_number(annotation: Any) -> bool:
    """Whether a field of this annotation holds a number (int or float, possibly optional or in a list)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        return bool not in typing.get_args(annotation) and any(_is_number(a) for a in typing.get_args(annotation))
    return False


def no_booleans_for_numbers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse `true`/`false` where a number is meant: pydantic would read them as 1 and 0
    (`federation.rounds: true` would train one round)."""
    items = value if isinstance(value, list | tuple) else (value,)
    if any(isinstance(v, bool) for v in items) and _is_number(model.model_fields[info.field_name].annotation):
        raise ValueError(f"expected a number, got {str(value).lower()!s} (a boolean)")
    return value


class _Section(BaseModel):
    # no inf or nan in any float: no setting can use one (a learning rate of inf trains nothing but NaNs)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return no_booleans_for_numbers(cls, value, info)


_UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(path: str) -> str:
    """`~` and environment variables expanded as a shell does (`~/runs`, `$SCRATCH/runs`); a variable that is not
    set is an error, not a folder named after it."""
    if not is_utf8(path):
        raise ValueError(f"{path!r} holds a byte that is not UTF-8 (a file name in another encoding); rename it "
                         "or give another path")
    expanded = os.path.expandvars(os.path.expanduser(path))
    if unset := _UNSET_VARIABLE.search(expanded):
        raise ValueError(f"{path!r} names the environment variable {unset.group(1).strip('{}')}, which is not set; "
                         "set it or write the path out")
    return expanded


UserPath = Annotated[str, AfterValidator(expand_path)]  # every path a user writes in a config


SEED_LIMIT = 2**64  # torch.manual_seed takes 0 .. 2**64 - 1; numpy's generators take no negative seed
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
_SEED = TypeAdapter(Seed)


CHECK_RULES = "check_rules"  # validation context flag: also enforce the rules across fields


def _enforce_rules(model: Any, info: ValidationInfo) -> Any:
    """Raise the model's `rule_problems()` when the validation context asks for them."""
    if (info.context or {}).get(CHECK_RULES) and (problems := model.rule_problems()):
        raise ValueError("; ".join(dict.fromkeys(problems)))
    return model


DatasetName = Annotated[str, OneOf(DATASETS)]  # a name in fedmef_core.registry.DATASETS, checked when validated


class DataConfig(_Section):
    name: DatasetName = Field("fashion_mnist", description="Dataset to train on.")
    root: UserPath = Field(
        "data/raw",
        description="Folder for torchvision downloads and user-supplied datasets (cinic10, tinyimagenet).",
    )
    cifar_shape: bool = Field(
        False, description="Pad 28x28 images to 32x32 and repeat to 3 channels, so CIFAR models run unchanged."
    )
    augment: bool = Field(False, description="Random crop (pad 4) and horizontal flip during local training.")
    train_limit: int | None = Field(
        None, ge=1, description="Use only the first N training samples (quick runs and tests)."
    )
    test_limit: int | None = Field(None, ge=1, description="Use only the first N test samples.")


class PartitionConfig(_Section):
    scheme: Literal["iid", "dirichlet", "shards"] = Field(
        "dirichlet", description="How the training set is split among clients."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration: smaller means more label skew.")
    classes_per_client: int = Field(2, ge=1, description="Classes per client for the `shards` scheme.")
    min_samples: int = Field(10, ge=1, description="Every client holds at least this many samples.")
    seed: Seed | None = Field(
        None, description="Seed of the split (null: the experiment's top-level `seed`)."
    )


class ModelConfig(_Section):
    arch: Annotated[str, OneOf(ARCHITECTURES)] = Field(  # a name in fedmef_core.registry.ARCHITECTURES
        "cnn", description="Network architecture (resnet8: the ResNet family at CPU size, 78k parameters)."
    )
    norm: Literal["auto", "batch", "nsconv"] = Field(
        "auto",
        description="Normalisation: BatchNorm layers, or none at all with every conv a normalized sparse "
        "convolution (NSConv, FedMef's weight-standardized conv). auto = the method's own: NSConv for fedmef "
        "(as in the paper), BatchNorm for the others.",
    )


class FederationConfig(_Section):
    num_clients: int = Field(100, ge=1, description="N: clients holding disjoint shards.")
    clients_per_round: int = Field(10, ge=1, description="K: clients sampled each round.")
    rounds: int = Field(16, ge=1, description="R: communication rounds.")
    local_epochs: int = Field(2, ge=1, description="E: local epochs per round.")
    batch_size: int = Field(32, ge=1, description="B: local mini-batch size.")
    micro_batch: int | None = Field(
        None, ge=1,
        description="Split each local batch into micro-batches of at most this many samples and add up their "
        "gradients before the one optimizer step: the same batch and steps with the activations of a micro-batch "
        "(BatchNorm normalises each micro-batch on its own). null: no split. devices.policy accumulate sets it "
        "per client.",
    )
    optimizer: Literal["sgd"] = Field("sgd", description="Local optimizer.")
    lr: float = Field(0.1, gt=0, description="Learning rate in the first round (the authors start at 0.1).")
    lr_final: float = Field(0.02, gt=0, description="Learning rate in the last round (exponential decay).")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (the paper uses none).")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay.")
    seed: Seed | None = Field(
        None,
        description="Seed for initialisation, client sampling and local shuffling (null: the experiment's "
        "top-level `seed`).",
    )
    min_clients: int = Field(
        1, ge=1, description="A round needs at least this many successful client updates, else the run stops."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Local training arithmetic: fp32, or mixed precision with autocast to bfloat16 or float16 "
        "(fp16 adds gradient scaling). Weights, optimizer and aggregation stay fp32.",
    )

    def rule_problems(self) -> list[str]:
        problems = []
        if self.clients_per_round > self.num_clients:
            problems.append(f"federation.clients_per_round ({self.clients_per_round}) cannot exceed "
                            f"federation.num_clients ({self.num_clients})")
        if self.min_clients > self.clients_per_round:
            problems.append(f"federation.min_clients ({self.min_clients}) cannot exceed "
                            f"federation.clients_per_round ({self.clients_per_round})")
        return problems

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> FederationConfig:
        return _enforce_rules(self, info)  # here too, so they are reported beside other sections' errors



PruningMethod = Annotated[str, OneOf(METHODS)]  # a name in fedmef_core.registry.METHODS, checked when validated


class PruningConfig(_Section):
    method: PruningMethod = Field(
        "fedmef",
        description="Federated (pruning) method: fedavg is dense; the others train a sparse model at `density`.",
    )
    density: float = Field(
        0.1, gt=0, le=1,
        description="d: fraction of prunable (Conv2d/Linear) weights kept. The dense `fedavg` runs (and logs) 1.0.",
    )
    distribution: Literal["erk", "uniform"] = Field(
        "erk", description="Per-layer densities: Erdos-Renyi-Kernel (ERK) or the same in every layer."
    )
    adjust_interval: int = Field(4, ge=1, description="Delta R: rounds between mask adjustments.")
    adjust_until: int = Field(12, ge=0, description="R_end: no adjustment after this round.")
    adjust_alpha: float = Field(0.2, ge=0, le=1, description="alpha: initial fraction of weights moved.")
    bae_lambda: float = Field(
        1.0, ge=0, description="FedMef BaE: lambda, weight of the extrusion loss (the paper's 0.01 is too weak "
        "here: the marked weights grow during the round instead of shrinking)."
    )
    bae_norm: Literal["l2", "squared_l2"] = Field(
        "l2", description="FedMef BaE: norm of the marked weights in the extrusion loss (authors' code: l2)."
    )
    bae_psi: float = Field(1.0, ge=0, description="FedMef BaE: psi, scale of the budget-aware learning rate.")
    bae_xi: float = Field(0.1, gt=0, description="FedMef BaE: xi, upper bound of the local learning rate.")
    prunefl_reallocate: bool = Field(
        True,
        description="PruneFL: rank accumulated squared gradients over all layers at once, so weights move "
        "between layers (global density stays d); false keeps every layer's count fixed.",
    )
    bn_select: bool = Field(
        False,
        description="FedTiny/FedMef adaptive BN selection: before round 1 the clients adapt BatchNorm statistics "
        "to each of `bn_candidates` initial masks and rate them on their data; the server keeps the best.",
    )
    bn_candidates: int = Field(
        5, ge=2, description="Candidate initial masks for `bn_select` (layer densities drawn around ERK/uniform)."
    )


class SapConfig(_Section):
    enabled: bool | None = Field(
        None,
        description="Scaled activation pruning (SAP) in local training. null = auto: the method's own (on for "
        "fedmef, off for the others).",
    )
    gamma: float = Field(
        0.5, ge=0, lt=1, description="gamma: fraction of each Conv2d/Linear input dropped from the saved activations."
    )
    value_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Dtype of the kept activation values (the authors use float16)."
    )
    positions: Literal["index", "bitmap"] = Field(
        "bitmap", description="Positions of kept values: a 1-bit-per-entry bitmap, or int32 indices (the authors')."
    )
    relu_bitmask: bool = Field(
        True, description="ReLU/ReLU6 save a 1-bit mask for backward instead of their full output (the authors' "
        "code keeps the full output: false)."
    )


MAX_BUDGET_MIB = float(2**40)  # 1 EiB: far above any device, and its bytes stay finite in every computation


class DeviceTier(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                      description="Tier name (metrics: devices/<name>/...).")
    memory_mib: float = Field(gt=0, le=MAX_BUDGET_MIB, description="Memory budget of a device of this tier, MiB.")
    share: float = Field(gt=0, le=1, description="Fraction of the clients in this tier.")


DEFAULT_TIERS = (
    DeviceTier(name="small", memory_mib=64, share=0.4),
    DeviceTier(name="medium", memory_mib=128, share=0.3),
    DeviceTier(name="large", memory_mib=256, share=0.2),
    DeviceTier(name="xlarge", memory_mib=1024, share=0.1),
)


class DevicesConfig(_Section):
    """Each client's device: a memory budget its training step must fit (fedmef_core.devices)."""

    profile: Literal["none", "tiers", "trace"] = Field(
        "none",
        description="none: every client unlimited (memory is only reported); tiers: budgets drawn with the "
        "partition seed in the shares of `tiers`; trace: one budget per client from the CSV `trace`.",
    )
    tiers: tuple[DeviceTier, ...] = Field(DEFAULT_TIERS, min_length=1, description="Tiers (profile: tiers).")
    trace: UserPath | None = Field(
        None, description="CSV with header client_id,memory_mib, one row per client (profile: trace)."
    )
    trace_sha256: str | None = Field(
        None,
        description="The trace's sha256, read from the file when the config is validated (not set by hand): a run's "
        "identity holds it instead of the path, so an edited trace is another experiment in another run folder.",
    )
    correlate: Literal["none", "labels"] = Field(
        "none",
        description="labels: the smallest devices hold the clients whose data lean most on the first half of the "
        "classes (a label mix of their own, so leaving them out costs accuracy); none: budgets drawn at random.",
    )
    policy: Literal["exclude", "fit_batch", "fit_gamma", "accumulate"] = Field(
        "exclude",
        description="A client whose step does not fit: exclude (not trained that round, counted); fit_batch (the "
        "largest batch <= federation.batch_size that fits, down to min_batch); fit_gamma (SAP methods: the "
        "smallest SAP gamma >= sap.gamma that fits, up to max_gamma, then the batch); accumulate (the batch stays "
        "federation.batch_size, trained in micro-batches of the largest size that fits, down to min_batch, "
        "whose gradients add up before each step).",
    )
    bound: Literal["footprint", "total"] = Field(
        "footprint",
        description="What the budget bounds: footprint = weights as stored + saved activations (the paper's "
        "measure), total = + gradients and optimizer state.",
    )
    min_batch: int = Field(4, ge=1, description="Smallest batch fit_batch/fit_gamma may use.")
    max_gamma: float = Field(0.95, gt=0, lt=1, description="Largest SAP gamma fit_gamma may use.")
    headroom: float = Field(
        0.02, ge=0, lt=1,
        description="The plan fits a client to (1 - headroom) x its budget: SAP keeps a data-dependent share, so "
        "what a step holds can exceed the planner's figure slightly (within 2%); enforcement uses the whole budget.",
    )
    enforce: bool = Field(
        True,
        description="Measure what each client holds while it trains (saved tensors; CUDA: also its peak); a step "
        "above its budget fails that client as a device out-of-memory would (dropped, counted as over budget).",
    )

    @model_validator(mode="before")
    @classmethod
    def _trace_by_content(cls, raw: Any) -> Any:
        """Read the trace's digest now: what a run computes from, whatever its path. A trace that cannot be read
        keeps the digest it was given (a config read back from a checkpoint); reading it fails the run later with
        its own message."""
        if not isinstance(raw, dict) or raw.get("profile") != "trace" or not isinstance(raw.get("trace"), str):
            return raw
        try:
            digest = file_sha256(Path(expand_path(raw["trace"])))
        except (OSError, ValueError):
            return raw
        return {**raw, "trace_sha256": digest}

    @property
    def enabled(self) -> bool:
        return self.profile != "none"

    def rule_problems(self) -> list[str]:
        problems = []
        if self.profile == "trace" and not self.trace:
            problems.append("devices.profile is 'trace' but devices.trace is not set; give the CSV's path "
                            "(header client_id,memory_mib)")
        if self.profile == "tiers":
            total = sum(t.share for t in self.tiers)
            if abs(total - 1.0) > 1e-6:
                problems.append(f"devices.tiers' shares add up to {total:g}, not 1; make them sum to 1")
            names = [t.name for t in self.tiers]
            if len(set(names)) != len(names):
                problems.append(f"devices.tiers' names repeat ({', '.join(names)}); give each tier its own name")
        return problems

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> DevicesConfig:
        return _enforce_rules(self, info)


TRACKING_URI_FORMS = "sqlite:///path/to/mlflow.db (a local store) or http(s)://host:port (an MLflow server)"


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow.")
    mlflow_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: sqlite:///path (a local store) or http(s)://host:port (a server). "
        "Credentials in it (http://user:password@host) move to MLFLOW_TRACKING_USERNAME/PASSWORD and are never "
        "logged or stored.",
    )
    experiment: str = Field("fedmef", min_length=1, max_length=500, description="MLflow experiment name.")
    system_metrics: bool = Field(
        False,
        description="Also log MLflow system metrics (system/*: CPU, memory, disk, network; GPU with pynvml) every "
        "10 s while training (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL changes the period).",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _accepted_uri_without_credentials(cls, uri: str) -> str:
        """Refuse what MLflow 3 cannot track to (other schemes, a bare path: MLflow's retired file store), and
        move `user:password@` out of the URI into the variables MLflow reads (unless they are set), so no
        message, param, artifact or checkpoint ever holds the password."""
        parts = urlsplit(uri.strip())
        if parts.scheme in ("http", "https") and parts.hostname:
            if parts.username is None and parts.password is None:
                return uri.strip()
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", parts.username or "")
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", parts.password or "")
            return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        if parts.scheme == "sqlite" and parts.path.strip("/"):  # sqlite:///relative or sqlite:////absolute
            path = parts.path[1:]
            expanded = expand_path(path)
            return uri.strip() if expanded == path else f"sqlite:///{expanded}"
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        raise ValueError(f"{shown!r} is not a tracking URI MLflow 3 accepts; use {TRACKING_URI_FORMS}, "
                         "e.g. sqlite:///mlflow.db")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join (e.g. ray://head:10001 or auto); null starts a local cluster."
    )
    local_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster started here (null: all).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each client update.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved by each client update; a fraction lets clients share a GPU (0.25: 4)."
    )


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where clients train.")
    runner: Literal["local", "ray"] = Field(
        "local",
        description="Where client updates run: in this process (in the flow's own thread when `workers` is 1, "
        "each update handed to the aggregation in memory as it is trained; else a thread pool), or as tasks on "
        "a Ray cluster (updates passed as files).",
    )
    workers: int = Field(1, ge=1, description="Client updates run concurrently by the task runner.")
    threads: int = Field(
        2,
        ge=1,
        le=1024,
        description="torch CPU threads a training process uses (they also decide the last bits of the results, "
        "so the default is fixed rather than 'all cores'; a sweep's cells share the cores; a Ray client uses the "
        "ray.num_cpus it reserves).",
    )
    run_dir: UserPath | None = Field(
        None,
        description="Folder of this run's checkpoints, metrics and plots (the *_dir paths below are relative to "
        "it). null: runs/<method>-<arch>-d<density>-s<seed>-<config digest>, one folder per experiment; the DVC "
        "stages use '.'.",
    )
    exchange_dir: UserPath | None = Field(
        None,
        description="Folder for per-round weight files passed to workers (null: `.exchange` in the run folder; "
        "not used by one local worker); on a multi-node Ray cluster, a path every node shares.",
    )
    client_retries: int = Field(1, ge=0, description="Retries of a failing client update before it is dropped.")
    resume: bool = Field(
        True, description="Continue from the newest good checkpoint written by the same configuration."
    )
    checkpoint_every: int = Field(5, ge=1, description="Write a checkpoint every N rounds (and at the end).")
    eval_every: int = Field(1, ge=1, description="Evaluate the global model every N rounds (and at the end).")
    eval_mean_last: int = Field(
        5,
        ge=1,
        le=10_000,
        description="Report, beside the last round's test accuracy, its mean over the last N evaluated rounds "
        "(one round's accuracy swings by several points; a sweep compares methods on this mean).",
    )
    partitions_dir: UserPath = Field(
        "data/partitions", description="Where the partition (client indices, statistics, heat map) is written."
    )
    checkpoints_dir: UserPath = Field("checkpoints", description="Where checkpoints are written (inside run_dir).")
    metrics_dir: UserPath = Field("metrics", description="Where metrics JSON/CSV are written (inside run_dir).")
    plots_dir: UserPath = Field("plots", description="Where PNG plots are written (inside run_dir).")


SEEDED_SECTIONS = ("partition", "federation")  # their `seed: null` means the experiment's top-level `seed`


class ExperimentConfig(_Section):
    seed: Seed = Field(
        0,
        description="The experiment's seed: partition.seed and federation.seed follow it unless set, so one "
        "key draws the whole experiment anew (a grid of seeds: dvc exp run --queue -S seed=0,1,2).",
    )
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    federation: FederationConfig = FederationConfig()
    pruning: PruningConfig = PruningConfig()
    sap: SapConfig = SapConfig()
    devices: DevicesConfig = DevicesConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_method_defaults(cls, data: Any) -> Any:
        """`model.norm: auto` and `sap.enabled: null` become what the method runs (the method declares
        it: NSConv and SAP for fedmef, as in the paper), and a dense method's density becomes 1.0 — so a
        validated config, and everything logged from it, says what ran."""
        if not isinstance(data, dict):
            return data
        method = _value(data.get("pruning"), "method", PruningConfig.model_fields["method"].default)
        traits = method_traits(method)
        if traits is None:
            return data  # an unknown method: the field's own validation names it
        data = dict(data)
        if _value(data.get("model"), "norm", "auto") == "auto":
            data["model"] = _replaced(data.get("model"), norm=traits.norm)
        if _value(data.get("sap"), "enabled", None) is None:
            data["sap"] = _replaced(data.get("sap"), enabled=traits.sap)
        if not traits.sparse and _is_density(_value(data.get("pruning"), "density", 1.0)):
            data["pruning"] = _replaced(data.get("pruning"), density=1.0)  # else its validation names the value
        return data

    @model_validator(mode="before")
    @classmethod
    def _resolve_seeds(cls, data: Any) -> Any:
        """A section seed left null becomes the top-level `seed`, so a validated config holds the seeds that
        ran: run names, digests, checkpoints and MLflow params name them."""
        if not isinstance(data, dict):
            return data
        try:
            seed = _SEED.validate_python(data.get("seed", cls.model_fields["seed"].default))
        except ValidationError:
            return data  # the field's own validation names it, once
        data = dict(data)
        for name in SEEDED_SECTIONS:
            if _value(data.get(name), "seed", None) is None:
                data[name] = _replaced(data.get(name), seed=seed)
        return data

    def rule_problems(self) -> list[str]:
        """Rules across fields, each broken one as a sentence naming the fields and the fix."""
        p = self.pruning
        problems = self.federation.rule_problems() + self.devices.rule_problems()
        if p.bn_select and not method_traits(p.method).selects_initial_mask:
            problems.append(f"pruning.bn_select is FedTiny's initial-mask selection: it needs pruning.method "
                            f"fedtiny or fedmef (got {p.method!r}); set pruning.bn_select: false")
        elif p.bn_select and self.model.norm != "batch":
            problems.append("pruning.bn_select adapts BatchNorm statistics but model.norm is 'nsconv' (no "
                            "BatchNorm); set model.norm: batch or pruning.bn_select: false")
        return problems

    @model_validator(mode="after")
    def _rules_across_fields(self, info: ValidationInfo) -> ExperimentConfig:
        # enforced where a config enters (parse_config: CLI, DVC) and at the start of every flow (`checked`);
        # Prefect's own parameter validation skips them, so a form that breaks one fails the run with one
        # message (flows.cli.fails_cleanly) instead of a validation traceback
        return _enforce_rules(self, info)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def identity(self) -> dict[str, Any]:
        """What determines the results: everything but where and how it runs."""
        return identity_of(self.model_dump(mode="json"))

    def as_params(self) -> dict[str, Any]:
        """The dump as `params.yaml` spells it: a section seed equal to the top-level `seed` is written null
        (it follows `seed`), so changing `seed` alone — `dvc exp run -S seed=1`, the UI form — moves it too.
        Validating it gives this config back."""
        dumped = self.model_dump(mode="json")
        for name in SEEDED_SECTIONS:
            if dumped[name]["seed"] == self.seed:
                dumped[name]["seed"] = None
        return dumped

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_params(), sort_keys=False)


# not part of an experiment's identity: where and how it runs, and the top-level seed (it acts only through the
# section seeds it sets)
RUN_ONLY_SECTIONS = ("tracking", "runtime", "ray")  # where and how a run executes, not what it computes
NOT_IDENTITY = (*RUN_ONLY_SECTIONS, "seed")


def _value(section: Any, key: str, default: Any) -> Any:
    """`key` of a raw section (a mapping, a section model or absent)."""
    if isinstance(section, BaseModel):
        return getattr(section, key)
    if isinstance(section, dict):
        return section.get(key, default)
    return default


def _replaced(section: Any, **values: Any) -> Any:
    """A raw section with `values` set (a section model stays a model)."""
    if isinstance(section, BaseModel):
        return section.model_copy(update=values)
    if section is not None and not isinstance(section, dict):
        return section  # not a mapping: the section's own validation names it
    return {**(section or {}), **values}


def _is_density(value: Any) -> bool:
    """Whether `value` is a density a config accepts (a dense method's is then replaced by 1.0)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def identity_of(dumped: dict[str, Any]) -> dict[str, Any]:
    """The sections of a dumped config that determine results (also for configs stored in checkpoints). The
    top-level `seed` is left out: the resolved `partition.seed` and `federation.seed` hold what it decides (so
    a config written before it existed has the same identity). A file the config points to counts by its
    contents, not its path: the device trace by `devices.trace_sha256`."""
    identity = {k: v for k, v in dumped.items() if k not in NOT_IDENTITY}
    devices = identity.get("devices")
    if isinstance(devices, dict) and devices.get("profile", "none") == "none":
        identity.pop("devices", None)  # unlimited devices: the identity of a config written before they existed
    elif isinstance(devices, dict) and devices.get("profile") == "trace":
        identity["devices"] = {k: v for k, v in devices.items() if k != "trace"}
        identity["devices"]["trace_sha256"] = devices.get("trace_sha256")  # None: contents never read
    elif isinstance(devices, dict):
        identity["devices"] = {k: v for k, v in devices.items() if k != "trace_sha256"}  # tiers: as before it
    federation = identity.get("federation")
    if isinstance(federation, dict) and federation.get("micro_batch") is None:  # no split: as before it existed
        identity["federation"] = {k: v for k, v in federation.items() if k != "micro_batch"}
    return identity


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ConfigError(UserError, ValueError):
    """A user mistake in the configuration. Its message is the whole story: no traceback needed."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"- {loc}: unknown key (check the spelling; allowed keys are listed in params.yaml's defaults)"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or not loc:  # our own checks name their keys and values (credentials left out)
        return f"- {loc}: {msg}" if loc else f"- {msg}"
    ctx = err.get("ctx") or {}
    allowed = f"; allowed: {ctx['expected']}" if "expected" in ctx else ""
    return f"- {loc}: {msg} (got {err.get('input')!r}){allowed}"


def _sections(raw: Any, source: str) -> dict[str, Any]:
    """The top level of a config: a mapping of sections (an empty file counts as no sections)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (data:, federation:, ...), got a {type(raw).__name__}; "
            "see params.yaml in the repository for the layout"
        )
    return raw


def parse_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping. Raises :class:`ConfigError` naming every bad key and value."""
    try:
        return ExperimentConfig.model_validate(_sections(raw, source), context={CHECK_RULES: True})
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def checked(config: ExperimentConfig, source: str = "flow parameters") -> ExperimentConfig:
    """`config` if it keeps every rule across fields, else :class:`ConfigError` naming them."""
    if problems := config.rule_problems():
        raise ConfigError(f"{source} are invalid:\n" + "\n".join(f"- {p}" for p in problems))
    return config


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe subset, with a key written twice in one mapping an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class names it
                continue
            if first is not None:
                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                raise yaml.MarkedYAMLError(problem=f"{key!r} is written twice ({lines}), so one would be "
                                           "silently dropped; keep one")
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def read_yaml(text: str, source: str) -> Any:
    """Parse `text` (from `source`, named in the message) with :class:`_StrictLoader`; a YAML mistake is one
    :class:`ConfigError` line naming where it is."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML: {problem}{at}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` (a `--set` argument) -> (`section.key`, value): the value is read as YAML (numbers,
    booleans, null, lists), except that a ``#`` never starts a comment in it — a value YAML would cut there
    (``/tmp/my run #2``) is taken whole, as text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set federation.rounds=5")
    source = f"--set {text!r}"
    parsed = read_yaml(value, source)
    try:
        node = yaml.compose(value, Loader=_StrictLoader)
    except yaml.YAMLError:  # read_yaml has parsed it: not reached
        node = None
    if value.strip() and (node is None or node.end_mark.index < len(value.rstrip())):
        return key.strip(), value.strip()  # YAML took part of it for a comment: the user meant all of it
    return key.strip(), parsed


# keys of ExperimentConfig that are values, not sections (`--set seed=1`)
TOP_LEVEL_VALUES = tuple(n for n, f in ExperimentConfig.model_fields.items() if not isinstance(f.default, BaseModel))


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate `params.yaml`; `overrides` maps `section.key` to a value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Run from the repository root or pass --params PATH.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: byte 0x{exc.object[exc.start]:02x} on line {line} is not UTF-8; save the "
                          "file as UTF-8") from None
    raw = _sections(read_yaml(text, str(path)), str(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key and dotted in TOP_LEVEL_VALUES:
            raw[dotted] = value
            continue
        if not key:
            raise ConfigError(f"override {dotted!r}: use section.key=value, e.g. federation.rounds=5 "
                              f"(top-level keys: {', '.join(TOP_LEVEL_VALUES)})")
        if raw.get(section) is None:  # absent, or an empty `section:` line
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        raw[section][key] = value
    return parse_config(raw, source=str(path))
