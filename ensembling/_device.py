"""Device selection and the numerical tolerances that go with a device."""

from __future__ import annotations

import torch

__all__ = ["default_device", "synchronize", "tolerances"]


def default_device() -> torch.device:
    """Return the accelerator of this machine if there is one, else the CPU.

    Uses :func:`torch.accelerator.current_accelerator` (CUDA, ROCm, MPS, XPU,
    ...), so no code path assumes CUDA.

    Returns
    -------
    torch.device
        For example ``device(type='cuda')`` on a GPU box, ``device(type='mps')``
        on Apple silicon, ``device(type='cpu')`` elsewhere.

    Examples
    --------
    >>> device = default_device()
    >>> device.type in {"cpu", "cuda", "mps", "xpu", "mtia", "hpu"}
    True
    >>> torch.zeros(2, device=device).device.type == device.type
    True
    """
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None:
            return accelerator
    return torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait until every kernel queued on ``device`` has finished.

    Timing code calls this before reading the clock, otherwise it measures
    how fast kernels are *queued* on an accelerator, not how fast they run.
    A no-op on the CPU.

    Parameters
    ----------
    device : torch.device or str
        The device to wait for, e.g. ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Examples
    --------
    >>> synchronize("cpu")  # returns immediately
    """
    device = torch.device(device)
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _tf32_enabled(device: torch.device, op: str) -> bool:
    """Whether float32 ``op`` ("matmul" or "conv") on ``device`` may run in TF32.

    Reads the ``fp32_precision`` settings (PyTorch 2.9+: the operation's own,
    then the global one) before the legacy ``allow_tf32`` flags, whose getters
    raise once the new API has been used.
    """
    if device.type != "cuda":
        return False
    backend = torch.backends.cudnn.conv if op == "conv" else torch.backends.cuda.matmul
    for precision in (getattr(backend, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        if op == "conv":
            return bool(torch.backends.cudnn.allow_tf32)
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # settings PyTorch cannot reconcile: assume the looser precision
        return True


def tolerances(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    op: str = "matmul",
) -> dict[str, float]:
    """Tolerances for comparing a vectorized result with a for-loop result.

    The loop and the vectorized code compute the same sums in a different
    order (different kernels, blocking and reductions), so they agree to a
    few units in the last place of the *effective* precision, scaled by the
    depth of the reductions. This returns ``rtol`` and ``atol`` for
    :func:`torch.testing.assert_close` from that effective precision:

    ===========================  =====================  ===============
    arithmetic                   unit roundoff          rtol = atol
    ===========================  =====================  ===============
    float64                      1.1e-16                1e-10
    float32                      6.0e-8                 1e-5
    float32 through TF32 (CUDA)  4.9e-4 (10-bit mant.)  1e-2
    bfloat16 / float16           3.9e-3 / 4.9e-4        5e-2 / 1e-2
    ===========================  =====================  ===============

    float32 on an accelerator other than CUDA (e.g. MPS) gets ``1e-4``: its
    kernels may use fused or reduced-precision accumulation that this
    package cannot inspect.

    Parameters
    ----------
    dtype : torch.dtype, default torch.float32
        The dtype of the compared tensors.
    device : torch.device or str, default "cpu"
        Where they were computed.
    op : {"matmul", "conv"}, default "matmul"
        Which CUDA TF32 switch applies: ``torch.backends.cuda.matmul.allow_tf32``
        for matrix products, ``torch.backends.cudnn.allow_tf32`` (on by default)
        for convolutions.

    Returns
    -------
    dict
        ``{"rtol": ..., "atol": ...}``, ready to be splatted into
        :func:`torch.testing.assert_close`.

    Examples
    --------
    >>> tolerances(torch.float32, "cpu")
    {'rtol': 1e-05, 'atol': 1e-05}
    >>> tolerances(torch.float64, "cpu")
    {'rtol': 1e-10, 'atol': 1e-10}
    """
    if op not in ("matmul", "conv"):
        raise ValueError(f"tolerances: op must be 'matmul' or 'conv', got {op!r}")
    device = torch.device(device)
    if dtype == torch.float64:
        tol = 1e-10
    elif dtype == torch.bfloat16:
        tol = 5e-2
    elif dtype == torch.float16:
        tol = 1e-2
    elif dtype == torch.float32:
        if _tf32_enabled(device, op):
            tol = 1e-2
        elif device.type in ("cpu", "cuda"):
            tol = 1e-5
        else:
            tol = 1e-4
    else:
        raise ValueError(
            f"tolerances: no tolerance for dtype {dtype}; compare floating-point "
            "results (float64, float32, bfloat16 or float16)"
        )
    return {"rtol": tol, "atol": tol}
