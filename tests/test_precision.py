"""A computation can ask for float32 by an argument, without changing the process's environment."""

from __future__ import annotations

import os

import torch

from wsi_il.precision import autocast, mixed_precision_dtype, precision_name


def test_float32_is_asked_for_by_argument_where_bf16_would_be_chosen(monkeypatch):
    monkeypatch.delenv("WSI_IL_PRECISION", raising=False)
    assert mixed_precision_dtype("cuda") is torch.bfloat16  # CUDA computes bf16 natively (no GPU needed to say so)
    assert mixed_precision_dtype("cuda", "fp32") is None and precision_name("cuda", "fp32") == "fp32"
    assert precision_name("cuda") == "bf16"
    assert "WSI_IL_PRECISION" not in os.environ


def test_autocast_asked_for_float32_leaves_the_computation_in_float32(monkeypatch):
    monkeypatch.delenv("WSI_IL_PRECISION", raising=False)
    layer = torch.nn.Linear(4, 2)
    with autocast("cpu", wanted="fp32"):
        out = layer(torch.ones(1, 4))
    assert out.dtype == torch.float32
