"""Tensors: digests, finiteness, CPU copies, and the parameter dtypes a model is built in.

:data:`PARAMETER_DTYPES` (``model.dtype``) lives here, at the bottom of the
package, so that the recipe (which validates the name) and
:mod:`pl_parablock.model.build` (which builds in the dtype) share one
vocabulary without the recipe importing the model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

PARAMETER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The parameter dtypes a model is built or loaded in (``model.dtype``), by name."""


def digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order): equal digests, bitwise equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite (one sum in its own dtype decides unless it overflows)."""
    if not t.is_floating_point():
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def cpu_copy(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}
