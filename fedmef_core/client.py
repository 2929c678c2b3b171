"""Local training on one client: the shared loop every method runs, varied only through hooks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmef_core.algorithms import ClientResult, FederatedAlgorithm, build_algorithm
from fedmef_core.algorithms.records import RoundPayload
from fedmef_core.budget import ClientPlan, MemoryGuard
from fedmef_core.config import ExperimentConfig
from fedmef_core.data import ImageData, iterate_batches
from fedmef_core.device import autocast, grad_scaler, seed_from
from fedmef_core.errors import UserError
from fedmef_core.models import build_model
from fedmef_core.sap import apply_sap, resolve_sap
from fedmef_core.wire import Record


class NonFiniteLossError(UserError, RuntimeError):
    """Local training produced a NaN or infinite loss: the run stops (a retry would do the same)."""


@dataclass
class Broadcast(Record):
    """What the server sends to the clients of a round: the global weights (`state`) and the method's `payload`;
    ``setup`` instead asks for the method's answer to its one-off setup exchange (round 0: nothing trains);
    ``plans``: how each client with a memory budget trains (:meth:`ClientPlan.to_dict` by client id; a client
    without one trains as configured)."""

    round: int
    lr: float
    state: dict[str, torch.Tensor]
    payload: RoundPayload = field(default_factory=RoundPayload)
    setup: Record | None = None
    plans: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.to_wire()

    def plan_of(self, client_id: int) -> ClientPlan | None:
        plan = self.plans.get(client_id)
        return None if plan is None else ClientPlan.from_dict(plan)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Broadcast:
        return cls.from_wire(d)


def local_train(
    model: nn.Module,
    data: ImageData,
    indices: Sequence[int] | torch.Tensor,
    *,
    config: ExperimentConfig,
    algorithm: FederatedAlgorithm,
    payload: RoundPayload,
    lr: float,
    generator: torch.Generator,
    device: torch.device,
    client_id: int = -1,
    plan: ClientPlan | None = None,
) -> ClientResult:
    """Train `model` in place for `local_epochs` on the client's samples and return its update. The method's
    :class:`~fedmef_core.algorithms.base.ClientRound` (made here, once the model is on `device`) varies the
    steps through its hooks. With a `plan` whose budget is enforced, every step is measured against it
    (:class:`~fedmef_core.budget.MemoryGuard`)."""
    fed = config.federation
    model.to(device).train()
    client = algorithm.client_round(model, payload)
    guard = MemoryGuard(model, plan, config, client_id) if plan is not None and plan.enforce else None
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=fed.momentum, weight_decay=fed.weight_decay
    )
    scaler = grad_scaler(device, fed.precision)
    total_steps = fed.local_epochs * math.ceil(len(indices) / fed.batch_size)

    def fresh_batches():  # for hooks that need data of their own (no augmentation), at most a micro-batch each
        return iterate_batches(data, indices, min(fed.micro_batch or fed.batch_size, fed.batch_size),
                               generator=generator, shuffle=True, device=device)

    step, loss_sum, seen, lr_sum = 0, 0.0, 0, 0.0
    for _ in range(fed.local_epochs):
        batches = iterate_batches(
            data, indices, fed.batch_size, generator=generator, shuffle=True,
            augment=config.data.augment, device=device,
        )
        for x, y in batches:
            step_lr = client.lr(lr, step, total_steps)  # the round's lr, or the method's own (FedMef's BaE)
            lr_sum += step_lr
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            optimizer.zero_grad(set_to_none=True)
            split = fed.micro_batch is not None and len(y) > fed.micro_batch
            for xs, ys in zip(x.split(fed.micro_batch), y.split(fed.micro_batch)) if split else ((x, y),):
                with guard.step(device) if guard is not None else nullcontext(), autocast(device, fed.precision):
                    loss = F.cross_entropy(model(xs), ys)
                    extra = client.extra_loss()
                objective = loss if extra is None else loss + extra
                if not torch.isfinite(objective):
                    raise NonFiniteLossError(
                        f"client {client_id}: loss became {objective.item()} at local step {step}; "
                        "lower federation.lr or check the data"
                    )
                # micro-batches: each adds its share of the batch's mean loss, so the step sees the batch's gradient
                scaler.scale(objective * (len(ys) / len(y)) if split else objective).backward()
                loss_sum += loss.item() * len(ys)
            scaler.unscale_(optimizer)  # hooks see true gradients
            client.before_step()
            scaler.step(optimizer)  # skipped (and the scale lowered) when an fp16 gradient overflowed
            scaler.update()
            client.after_step()
            seen += len(y)
            step += 1
            client.step_end(step, total_steps, fresh_batches)
    upload = client.upload(fresh_batches())
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return ClientResult(
        client_id=client_id,
        num_samples=len(indices),
        state=state,
        train_loss=loss_sum / max(seen, 1),
        steps=step,
        lr_mean=lr_sum / max(step, 1),
        upload=upload,
        memory=guard.report() if guard is not None else {},
    )


def run_client(
    config: ExperimentConfig,
    broadcast: Broadcast,
    client_id: int,
    data: ImageData,
    indices: Sequence[int] | torch.Tensor,
    device: torch.device,
) -> ClientResult:
    """One client's whole update, from the broadcast alone: what a task or a remote worker runs.

    Its randomness comes only from (seed, round, client), so the result does not depend on which
    worker runs it or in which order.
    """
    model = build_model(config.model, data.images.shape[1], data.num_classes, data.images.shape[-1])
    model.load_state_dict(broadcast.state)
    algorithm = build_algorithm(config)
    if broadcast.setup is not None:
        model.to(device)
        fed = config.federation

        def batches():
            return iterate_batches(data, indices, fed.batch_size, shuffle=False, device=device)

        answer = algorithm.client_setup(model, broadcast.setup, batches)
        return ClientResult(client_id=client_id, num_samples=len(indices), state={}, train_loss=0.0, steps=0,
                            upload=answer)
    plan = broadcast.plan_of(client_id)
    if plan is not None:
        config = plan.applied(config)  # the batch size and SAP gamma its device allows
    sap = resolve_sap(config)
    if sap is not None:
        apply_sap(model, sap)  # same parameters and state dict; only what backward saves changes
    generator = torch.Generator().manual_seed(
        seed_from(config.federation.seed, broadcast.round, client_id)
    )
    return local_train(
        model, data, indices, config=config, algorithm=algorithm,
        payload=broadcast.payload, lr=broadcast.lr, generator=generator, device=device,
        client_id=client_id, plan=plan,
    )
