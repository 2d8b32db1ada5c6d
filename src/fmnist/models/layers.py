"""Layers that are their torch counterparts with faster fp32 CPU paths: the same parameters,
state dicts, outputs and gradients (tests/test_models.py compares them with nn.Conv2d,
nn.Linear and nn.Dropout)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula


def _onednn_linear_op():
    """oneDNN's fully connected op on plain tensors, where this build of torch has it. Torch's
    fp32 matrix products on the CPU go to MKL, whose generic code path on non-Intel CPUs runs
    the post's 3136x1024 dense layer at under half of oneDNN's speed."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()

if _ONEDNN_LINEAR is not None:

    @register_flop_formula(_ONEDNN_LINEAR)
    def _onednn_linear_flops(x_shape, w_shape, *_, **__) -> int:
        """Torch's FLOP counter (`fmnist models`) counts the oneDNN product as it counts F.linear."""
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")  # x @ weight.T + bias


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T + bias with its forward and both gradients in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # (B, in), (out, in), (out,) or None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)  # (B, out)

    @staticmethod
    def backward(ctx, grad):  # (B, out)
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t(), None) if need_x else None  # grad @ weight
        grad_w = _onednn_linear(grad.t(), x.t(), None) if need_w else None  # grad.T @ x
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _plain_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer runs eagerly in plain fp32 on the CPU: not under autocast, tracing,
    torch.compile or ONNX export, which keep torch's own ops."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not _exporting_or_compiling())


def _exporting_or_compiling() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export())


class _ConvSumBias(torch.autograd.Function):
    """A 2-d convolution whose backward takes the bias gradient as a sum of the output gradient
    rather than in oneDNN's weight-gradient kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = stride, padding, dilation, groups
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # (B, out, H, W)
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False])
        grad_b = grad.sum((0, 2, 3)) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict) whose plain fp32 backward on the CPU sums
    the output gradient for the bias gradient: oneDNN's fp32 weight-gradient kernel takes
    3.0 instead of 1.0 ms for the post's first convolution when it also does the bias (1.2 ms
    more for the second), a sum takes 0.1. Otherwise it is nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias is not None and self.bias.requires_grad and torch.is_grad_enabled()
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and x.dim() == 4 and _plain_fp32_cpu(x, self.weight)):
            return _ConvSumBias.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


class Dense(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose plain fp32 products on the CPU run in
    oneDNN: forward and backward of the post's dense layer in about 6 instead of 15 ms a batch
    of 128 on the 2-core AMD EPYC. bf16 autocast, other devices, tracing and export take
    nn.Linear's own path (torch already uses oneDNN for bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ONEDNN_LINEAR is not None and x.dim() == 2 and _plain_fp32_cpu(x, self.weight):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


def _uniform_keep_mask(like: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """True where a unit is kept: uniform draws in float64, laid out as `like`, below `keep`."""
    return torch.empty_like(like, dtype=torch.float64).uniform_(generator=generator) < keep


@functools.cache
def _uniform_draws_torchs_dropout_mask() -> bool:
    """Whether `_uniform_keep_mask` draws, bit for bit, the mask torch's CPU Bernoulli sampler
    draws from the same generator: it does on CPUs where torch does not hand the sampler to
    MKL (MKL's is used on Intel's). Checked once, here, on a private generator."""
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    bernoulli = torch.empty(4096).bernoulli_(0.75, generator=generator).bool()
    generator.set_state(state)
    return torch.equal(bernoulli, _uniform_keep_mask(bernoulli, 0.75, generator))


class Dropout(nn.Dropout):
    """nn.Dropout whose training mask on the CPU comes from torch's uniform sampler where that
    draws the very mask torch's own Bernoulli sampler would (same values, same generator state
    after): there the Bernoulli sampler is a serial loop at 0.85 ms for the post's 128 x 1024
    units, the uniform one takes 0.4. Elsewhere, and under tracing, compile or export, it is
    nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and 0.0 < self.p < 1.0 and not self.inplace and x.device.type == "cpu"
                and not _exporting_or_compiling() and _uniform_draws_torchs_dropout_mask()):
            keep = 1.0 - self.p
            # torch's own steps (ATen's dropout): a mask laid out as x, in x's dtype, divided by
            # keep, times x.
            noise = _uniform_keep_mask(x, keep).to(x.dtype).div_(keep)
            return x * noise
        return super().forward(x)


