"""Where a training loop runs: one plain process (CPU, the default) or ``accelerate launch``.

The flow stages (base, adapters) take a :class:`Runner` and call it at the few places that
differ between the two: device placement, wrapping the trained modules for data-parallel
gradient sync, ``backward``, gradient clipping, autocast, and "only the main process writes
checkpoints". Under ``accelerate launch --num_processes N`` every process draws its own
batches (seeded by its rank), so the effective batch is ``N x batch``; all processes stop at
the same step (a deadline reached on one process stops all of them).

Detection (:func:`launched_by_accelerate`): ``accelerate launch`` sets
``ACCELERATE_MIXED_PRECISION`` in the environment of the processes it starts; ``torchrun``
(which ``accelerate launch --multi_gpu`` itself uses) sets ``WORLD_SIZE``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def launched_by_accelerate() -> bool:
    return "ACCELERATE_MIXED_PRECISION" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


class Runner:
    """Plain single process (``use_accelerate=False``) or an ``accelerate.Accelerator``."""

    def __init__(self, use_accelerate: bool | None = None):
        if use_accelerate is None:
            use_accelerate = launched_by_accelerate()
        self.acc = None
        if use_accelerate:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise SystemExit("accelerate is not installed: pip install 'safefm[gpu]' "
                                 "(or run scripts/train.py with plain python on the CPU)") from None
            self.acc = Accelerator(cpu=not torch.cuda.is_available())   # CPU-only: gloo data parallel
        self.device = self.acc.device if self.acc else torch.device("cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0
        self._stop = False

    def describe(self) -> str:
        if self.acc is None:
            return "1 process on the CPU"
        return (f"accelerate: {self.world} process(es) on {self.device.type}, "
                f"mixed precision {self.acc.mixed_precision}")

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call in the loss (data-parallel wrapped when it has trainable weights
        and there are several processes); its parameters stay those of ``module``."""
        if self.acc is None or not any(p.requires_grad for p in module.parameters()):
            return module
        return self.acc.prepare_model(module)

    def prepare_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return opt if self.acc is None else self.acc.prepare_optimizer(opt)

    def batch(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def autocast(self):
        return self.acc.autocast() if self.acc is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        if self.acc is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.acc.clip_grad_norm_(params, max_norm)

    def request_stop(self) -> None:
        """This process wants to stop (e.g. its deadline passed); see :meth:`should_stop`."""
        self._stop = True
        if self.acc is not None:
            self.acc.set_trigger()

    def should_stop(self) -> bool:
        """True on every process once any process requested a stop (a collective call)."""
        if self.acc is None:
            return self._stop
        return bool(self.acc.check_trigger())

    def wait(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def seed_offset(self) -> int:
        """Added to the data/noise seeds so each process draws its own batches."""
        return 104_729 * self.rank
