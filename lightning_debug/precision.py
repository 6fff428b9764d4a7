"""Float noise vs bugs: one tolerance table, one float64 re-run.

Two computations that should agree (a batch and its examples alone; a decoder's running score and a
teacher-forced forward) use different kernels and shapes, so they never agree to the bit. The checks compare
them within ``|Δ| <= rtol·|reference| + atol·n_tokens``, with ``(rtol, atol)`` read from :data:`TOLERANCES`
by the working precision (measured: shared/reference §4). A difference above it is re-run in float64 on the
CPU (:func:`float64_on_cpu`), where float noise shrinks by ~1e8 and a bug stays: only what survives is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

#: ``(rtol, atol per scored token)`` by working precision.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-6),
    "float32_cpu": (1e-5, 1e-6),
    "float32_gpu": (1e-4, 1e-6),
    "float32_tf32": (5e-3, 1e-5),  # TF32 matmuls (or convolutions) keep a 10-bit mantissa
    "half": (3e-2, 1e-3),  # float16 / bfloat16
}


def _tf32(module: nn.Module | None) -> bool:
    """TF32 in effect: for matmuls (``set_float32_matmul_precision`` below "highest"), or for the convolutions
    of ``module`` (cuDNN's flag, on by default, matters only when there are convolutions)."""
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32:
        return True
    convs = module is not None and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return convs and torch.backends.cudnn.allow_tf32


def precision_of(dtype: torch.dtype, device: torch.device, module: nn.Module | None = None) -> str:
    """The row of :data:`TOLERANCES` for parameters of ``dtype`` on ``device``."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float64:
        return "float64"
    if device.type != "cuda":
        return "float32_cpu"
    return "float32_tf32" if _tf32(module) else "float32_gpu"


def module_tolerance(module: nn.Module, *, scores_in_float32: bool = False) -> tuple[float, float]:
    """``(rtol, atol)`` for ``module`` from the dtype and device of its first floating parameter.

    ``scores_in_float32``: the compared scores pass through float32 whatever the parameters (Hugging Face
    ``generate()`` upcasts logits to float32 only), so a float64 model gets the float32 CPU row.
    """
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    row = precision_of(dtype, device, module)
    if row == "float64" and scores_in_float32:
        row = "float32_cpu"
    return TOLERANCES[row]


@contextlib.contextmanager
def float64_on_cpu(module: nn.Module) -> Iterator[Callable[[Any], Any]]:
    """Run ``module`` in float64 on the CPU; its own parameters and buffers are not touched.

    The float64 copies are swapped in as module attributes for the duration (``torch.func``'s
    reparametrisation), never through ``param.data``: a dtype change there resets the parameter's gradient
    accumulator and silently drops the hooks DDP registered on it (rank 0 would then skip the gradient
    all-reduce and hang the other ranks), and no deep copy of the module (or of the trainer it references) is
    made. Yields :func:`to_float64_cpu`, to convert a batch the same way. The default dtype is float64 inside,
    so tensors the user's code creates match.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    def as64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype)

    tensors = {name: as64(t) for name, t in (*module.named_parameters(), *module.named_buffers())}
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with _reparametrize_module(module, tensors, tie_weights=True):
            yield to_float64_cpu
    finally:
        torch.set_default_dtype(default)


def to_float64_cpu(batch: Any) -> Any:
    """Every tensor of ``batch`` on the CPU, floating ones in float64."""
    batch = move_data_to_device(batch, torch.device("cpu"))
    return apply_to_collection(batch, torch.Tensor, lambda t: t.double() if t.is_floating_point() else t)
