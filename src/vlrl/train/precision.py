"""What a training run's `dtype` means for its weights, forwards, gradients and optimizer state.

- `float32`: everything in fp32.
- `bfloat16` (mixed precision): the weights the optimizer updates (the master weights), their gradients and
  AdamW's moments stay fp32 -- and so do the checkpoints -- while the forwards whose loss is backpropagated run in
  bf16 under `torch.autocast`. A frozen reference model has no master weights and loads in bf16.
- `pure_bfloat16`: weights, gradients and optimizer state in bf16 (half the memory), only when asked for by that
  name: at the RL recipes' learning rates (1e-6 to 2e-6) most bf16 weights cannot move at all -- a bf16 number near
  0.02 is 1.2e-4 from its neighbours, and AdamW moves a weight by about the learning rate per step -- so training
  stalls without an error.

float16 is refused: without loss scaling its gradients underflow, and vlrl does no loss scaling.
Rollouts and validation generate from the master weights as they are (fp32 under `bfloat16`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype  # the trained weights, their gradients and optimizer state; the checkpoints
    compute_dtype: torch.dtype  # the training forwards

    @property
    def mixed(self) -> bool:
        return self.param_dtype != self.compute_dtype

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """The training forwards' context: autocast to `compute_dtype` when mixed, else nothing."""
        if not self.mixed:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=self.compute_dtype):
            yield


PRECISIONS = {
    "float32": Precision("float32", torch.float32, torch.float32),
    "bfloat16": Precision("bfloat16", torch.float32, torch.bfloat16),
    "pure_bfloat16": Precision("pure_bfloat16", torch.bfloat16, torch.bfloat16),
}


def precision_of(name: str) -> Precision:
    """The precision called `name`; float16 and unknown names are a ValueError that says why / what is valid."""
    if name == "float16":
        raise ValueError("dtype float16 is not supported for training: fp16 gradients need loss scaling, which "
                         "vlrl does not do; use bfloat16 (mixed precision with fp32 master weights)")
    if name not in PRECISIONS:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
