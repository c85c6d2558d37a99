"""What happens to the trained weights: AdamW under a learning-rate schedule, mixed precision,
gradient accumulation over micro-batches, gradient clipping, and an exponential moving average.

The names are diffusers' training scripts' (`--mixed-precision`, `--gradient-accumulation-steps`,
`--max-grad-norm`, `--lr-scheduler`, `--lr-warmup-steps`, `--use-ema`, `--ema-decay`). Schedules
are diffusers' (`get_scheduler`), the average torch's (`AveragedModel` with an EMA update):
nothing here re-derives what a library computes.

Mixed precision: the forward pass runs under autocast in fp16 or bf16; trained weights and the
optimizer's state stay fp32; frozen parts (text encoders, VAE, a frozen U-Net) are stored in the
low precision; fp16 scales the loss (`GradScaler`) so small gradients survive.

Accumulation: micro-batches of one group each add their share of the gradient (the loss divided
by the group's size); DDP synchronises once, on the group's last micro-batch (`no_sync` before),
and the optimizer steps then. Groups never span epochs: an epoch whose batch count is not a
multiple of N ends with a smaller group. Checkpoints are taken at group boundaries only, so a
resume continues exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def store_frozen_parts(model: nn.Module, dtype: torch.dtype | None) -> None:
    """The model's frozen parts (`Model.frozen_modules`) in `dtype`; trained weights stay fp32,
    LoRA's too, in the frozen layers they adapt (diffusers' scripts' `cast_training_params`).
    Under fp16 the VAE stays fp32 too, as in diffusers' SDXL scripts: SDXL's VAE overflows in
    fp16 (it encodes and decodes outside autocast, in its own dtype)."""
    if dtype is None:
        return
    for module in model.frozen_modules():
        if module is model.latent_encoder() and dtype == torch.float16:
            continue
        # torch's own to(), the cast diffusers' ModelMixin.to ends in: 0.42's warns first, on
        # every dtype cast, of modules that "should be kept in float32", even when it has none
        # ("[]", as the U-Net and the VAE have).
        nn.Module.to(module, dtype)
    for parameter in model.trained_module().parameters():
        parameter.data = parameter.data.float()


@dataclass
class Optimization:
    """The optimizer and everything that steps with it, for one run."""

    trained: nn.Module  # the model's part that trains (Model.trained_module)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    dtype: torch.dtype | None  # autocast's, None: fp32
    device_type: str
    max_grad_norm: float
    steps: int = 0  # optimizer steps taken

    @classmethod
    def build(
        cls,
        trained: nn.Module,
        device: torch.device,
        lr: float,
        schedule: str,
        warmup_steps: int,
        total_steps: int,
        precision: str = "no",
        max_grad_norm: float = 0.0,
        ema_decay: float | None = None,
    ) -> Optimization:
        from diffusers.optimization import get_scheduler

        parameters = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr)
        scheduler = get_scheduler(
            schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
        )
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ema = None
        if ema_decay is not None:
            average = get_ema_multi_avg_fn(ema_decay)
            ema = AveragedModel(trained, multi_avg_fn=average)
        return cls(
            trained,
            optimizer,
            scheduler,
            scaler,
            ema,
            PRECISIONS[precision],
            device.type,
            max_grad_norm,
        )

    def micro_step(
        self, model: nn.Module, batch, generator: torch.Generator, last: bool, group: int
    ) -> float:
        """Forward and backward of one micro-batch of a group of `group`; gradients are
        synchronised across ranks only on the `last` one. The micro-batch's own loss."""
        synchronised = last or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if synchronised else model.no_sync():
            with torch.autocast(self.device_type, self.dtype, enabled=self.dtype is not None):
                loss = model(batch, generator)
            self.scaler.scale(loss / group).backward()
        return float(loss.detach())

    def step(self) -> None:
        """Apply the group's gradient: unscale, clip, step, schedule, average."""
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            trained = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.scaler.get_scale() < scale:  # fp16 skipped no step (inf): as accelerate,
            self.scheduler.step()  # the schedule waits for the steps that are taken
        if self.ema is not None:
            self.ema.update_parameters(self.trained)
        self.steps += 1

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "steps": self.steps,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps = state["steps"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @contextlib.contextmanager
    def averaged(self):
        """The EMA weights in the trained module for the duration (validation, saving)."""
        if self.ema is None:
            yield
            return
        module = self.trained
        live = {name: p.detach().clone() for name, p in module.named_parameters()}
        averaged = dict(self.ema.module.named_parameters())
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(averaged[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(live[name])
