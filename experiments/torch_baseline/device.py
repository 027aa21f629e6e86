"""Where the PyTorch reference runs: `--torch_device=auto|cpu|cuda`, and full float32 on GPUs.

The reference runs the same code on every device: the servers (`fl._Server` and its
subclasses) take `device=` and move the model, the data tensors, the clients' state_dicts,
the hypernetworks (and hence their optimizers' state) there; batches are index tensors made
on the CPU (a DataLoader order or the JAX trainer's plan) and moved per step.

Comparing with JAX on a GPU needs full float32 on both sides: PyTorch's cuDNN convolutions use
TF32 by default on Ampere and later (torch.backends.cudnn.allow_tf32 = True), which rounds
the inputs of every conv to 10 mantissa bits (relative error ~1e-3). `full_fp32()` turns
TF32 off for matmuls and convolutions (jax: `jax_default_matmul_precision='highest'`, set by
the callers that compare). No JAX import here (the error type is imported when raised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _error(message: str) -> Exception:
    from pfedla_jax.errors import UserInputError  # (imports JAX; only on this error path)

    return UserInputError(message)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False for a CPU-only build of torch)."""
    return bool(torch.cuda.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a `--torch_device` value.

    Args:
      name: 'auto' (or None): 'cuda' if torch.cuda.is_available() else 'cpu'; 'cpu';
        'cuda' or 'cuda:K' (device K); or a torch.device.

    Returns:
      torch.device ('cuda' resolves to the current CUDA device, e.g. cuda:0).

    Raises:
      UserInputError (pfedla_jax.errors, a ValueError): an unknown name, or a CUDA device
        asked for when torch has none (a CPU build, no driver or no GPU), or an index past
        the last device.
    """
    if name is None:
        name = "auto"
    if isinstance(name, torch.device):
        device = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            # device 0, not torch.cuda.current_device(): that would create a CUDA context in
            # the calling process (gpu_check's parent only validates the flag)
            return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
        if text != "cpu" and text != "cuda" and not text.startswith("cuda:"):
            raise _error(f"unknown --torch_device {name!r}; expected one of "
                         f"{', '.join(DEVICE_CHOICES)} (or cuda:K)")
        try:
            device = torch.device(text)
        except RuntimeError:
            raise _error(f"unknown --torch_device {name!r}; expected one of "
                         f"{', '.join(DEVICE_CHOICES)} (or cuda:K)") from None
    if device.type == "cuda":
        if not cuda_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise _error(f"--torch_device={name} but torch {torch.__version__} ({build}) sees no "
                         "CUDA device; use --torch_device=auto or cpu")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise _error(f"--torch_device={name}: torch sees {torch.cuda.device_count()} CUDA "
                         "device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise _error(f"unsupported --torch_device {name!r}; expected one of {', '.join(DEVICE_CHOICES)}")
    return device


def describe(device: torch.device) -> str:
    """'cpu (N threads)' or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def full_fp32() -> dict[str, bool]:
    """Turns TF32 off for CUDA matmuls and cuDNN convolutions (process-wide).

    Returns the previous settings, {'matmul': bool, 'cudnn': bool}, for `restore_tf32`.
    Harmless on a CPU-only machine (the flags exist in every build).
    """
    before = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
              "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return before


def restore_tf32(before: dict[str, bool]) -> None:
    """Sets the TF32 flags back to what `full_fp32` returned."""
    torch.backends.cuda.matmul.allow_tf32 = before["matmul"]
    torch.backends.cudnn.allow_tf32 = before["cudnn"]


def tf32_settings() -> dict[str, bool]:
    """The current TF32 flags: {'matmul': ..., 'cudnn': ...} (True = TF32 allowed)."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32)}


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Context manager: TF32 off inside (full float32 matmuls and convs), restored after."""
    before = full_fp32()
    try:
        yield
    finally:
        restore_tf32(before)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA kernels run asynchronously); no-op on CPU.
    Call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
