"""Mixed precision where the hardware runs it natively: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX.

Elsewhere (older CPUs) bfloat16 is emulated and slower than float32, so everything stays float32 there.
``WSI_IL_PRECISION=fp32`` forces float32 everywhere (for comparisons and debugging); a caller that wants float32 for
one computation passes ``wanted="fp32"`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any


@functools.cache
def _cpu_has_bf16() -> bool:
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def mixed_precision_dtype(device: Any, wanted: str = "auto") -> Any:
    """Return torch.bfloat16 when ``device`` computes it natively, else None (float32); always None when ``wanted``
    is 'fp32'."""
    import torch

    if wanted == "fp32" or os.environ.get("WSI_IL_PRECISION", "auto").lower() == "fp32":
        return None
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and _cpu_has_bf16()):
        return torch.bfloat16
    return None


def precision_name(device: Any, wanted: str = "auto") -> str:
    """'bf16' or 'fp32': what the trunk and heads compute in on ``device`` (recorded with results)."""
    return "bf16" if mixed_precision_dtype(device, wanted) is not None else "fp32"


GRAPHS_ENV = "WSI_IL_CUDA_GRAPHS"
"""'0': no CUDA graphs (extraction's trunk and training steps run kernel by kernel), for comparison, or where
capture fails."""


def cuda_graphs_wanted(dev: Any) -> bool:
    """Whether work on ``dev`` is to be captured as CUDA graphs: on CUDA unless $WSI_IL_CUDA_GRAPHS is 0."""
    import torch

    return torch.device(dev).type == "cuda" and os.environ.get(GRAPHS_ENV, "1").strip() != "0"


@contextlib.contextmanager
def autocast(device: Any, cache: bool = True, wanted: str = "auto") -> Iterator[None]:
    """Run the enclosed forward passes in bfloat16 where that is native, else unchanged.

    ``cache=False`` casts weights anew at each use, as a captured CUDA graph needs (training steps): a cast
    cached from before the capture would not follow the weights' updates. ``wanted="fp32"`` keeps float32."""
    import torch

    dtype = mixed_precision_dtype(device, wanted)
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache):
        yield
