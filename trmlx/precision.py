"""The compute-dtype policy, decided once for both backends and recorded in every run's environment."""

from __future__ import annotations


def choose_dtype(task: str, requested: str, bf16_supported: bool, on_gpu: bool = True) -> tuple[str, str]:
    """Return (dtype, reason). auto: bf16 where the hardware has it; else fp16 with loss scaling, except T5/mT5
    (seq2seq), whose activations overflow fp16: fp32 there."""
    if requested != "auto":
        if requested == "bf16" and not bf16_supported:
            return "fp32", "bf16 requested but this device has no bf16; using fp32"
        return requested, "set in the recipe (model.dtype)"
    if not on_gpu:
        return "fp32", "CPU: fp32 (half precision is slow and lossy on CPUs)"
    if bf16_supported:
        return "bf16", "bf16 is supported on this device"
    if task != "seq2seq":
        return "fp16", "no bf16 on this device (e.g. T4, P100): fp16 with dynamic loss scaling"
    return "fp32", f"no bf16 on this device and {task} models (T5/mT5) overflow in fp16: fp32 compute"
