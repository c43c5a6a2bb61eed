"""Device selection and comparison tolerances."""

from __future__ import annotations

import pytest
import torch

import ensembling


def test_default_device_is_cpu_or_the_current_accelerator() -> None:
    """default_device() is the accelerator when one is available, else the CPU."""
    device = ensembling.default_device()
    if torch.accelerator.is_available():
        assert device.type == torch.accelerator.current_accelerator().type
    else:
        assert device == torch.device("cpu")


def test_synchronize_accepts_strings_and_devices(device: torch.device) -> None:
    """synchronize() works for the default device, given as a device or a string."""
    ensembling.synchronize(device)
    ensembling.synchronize(str(device))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)],
)
def test_cpu_tolerances_follow_the_dtype(dtype: torch.dtype, expected: float) -> None:
    """Coarser arithmetic gets looser tolerances, rtol and atol alike."""
    assert ensembling.tolerances(dtype, "cpu") == {"rtol": expected, "atol": expected}


def test_tf32_loosens_cuda_float32_only_when_enabled() -> None:
    """CUDA float32 is 1e-5 with TF32 off and 1e-2 with it on, per op family."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ensembling.tolerances(torch.float32, "cuda", op="conv")["rtol"] == 1e-2
        assert ensembling.tolerances(torch.float32, "cuda", op="matmul")["rtol"] == 1e-5
        assert ensembling.tolerances(torch.float32, "cpu", op="conv")["rtol"] == 1e-5
        torch.backends.cuda.matmul.allow_tf32 = True
        assert ensembling.tolerances(torch.float32, "cuda", op="matmul")["rtol"] == 1e-2
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="PyTorch < 2.9")
def test_tolerances_read_the_fp32_precision_api() -> None:
    """With TF32 set through fp32_precision (whose use makes the legacy getters raise), tolerances follow it."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        assert ensembling.tolerances(torch.float32, "cuda")["rtol"] == 1e-2
        assert ensembling.tolerances(torch.float32, "cuda", op="conv")["rtol"] == 1e-5
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert ensembling.tolerances(torch.float32, "cuda")["rtol"] == 1e-5
        assert ensembling.tolerances(torch.float32, "cpu")["rtol"] == 1e-5
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_other_accelerators_get_a_looser_float32_tolerance() -> None:
    """float32 on a backend we cannot inspect (MPS) is compared at 1e-4."""
    assert ensembling.tolerances(torch.float32, "mps")["rtol"] == 1e-4


def test_tolerances_reject_integers_and_unknown_ops() -> None:
    """Integer dtypes and unknown op families raise with the offending value."""
    with pytest.raises(ValueError, match="torch.int64"):
        ensembling.tolerances(torch.int64)
    with pytest.raises(ValueError, match="'fft'"):
        ensembling.tolerances(torch.float32, op="fft")


def test_tolerances_are_tight_enough_to_catch_a_real_difference() -> None:
    """A one-in-a-thousand error fails the float32 comparison."""
    x = torch.linspace(1, 2, 100)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(x * 1.001, x, **ensembling.tolerances(torch.float32))
