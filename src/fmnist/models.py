"""The model registry: each network is one decorated builder function.

    fmnist models
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from fmnist import FmnistError
from fmnist.data import IMAGE_SIZE, NUM_CLASSES


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, description: str):
    """Decorator adding a builder `fn(num_classes=..., **kwargs) -> nn.Module` to the registry."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, builder, description)
        return builder

    return wrap


def model_names() -> list[str]:
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FmnistError(f"unknown model {name!r}; choose from: {', '.join(_REGISTRY)}") from None


def build_model(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> nn.Module:
    return model_spec(name).builder(num_classes=num_classes, **kwargs)


def init_weights(model: nn.Module, scheme: str) -> None:
    """"default" keeps PyTorch's initialisation; "normal" draws every weight and bias from
    N(0, 1), as the post's `tf.random_normal` did. (The choices are `fmnist.config.Init`.)"""
    if scheme == "default":
        return
    if scheme != "normal":
        raise ValueError(f"unknown init {scheme!r}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs (a multiply-add counts two) for one 28x28 image, counted by torch."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    model.train(was_training)
    return counter.get_total_flops()


class MirrorAverage(nn.Module):
    """A network whose logits are the mean of the image's and its mirror image's, as `predict`
    and `evaluate` score a model trained with mirror images (model.json "tta")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        return (self.model(x) + self.model(x.flip(3))) / 2  # (B, classes)


# ----------------------------------------------------------------------------- layers


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


# ----------------------------------------------------------------------------- networks


class PostNet(nn.Module):
    """The post's ConvNet: two 5x5 SAME convolutions with 2x2 max-pooling, a 1024-unit dense
    layer with dropout, and a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, keep_prob: float = 0.75):
        super().__init__()
        self.conv1 = Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = Conv2d(32, 64, kernel_size=5, padding=2)
        side = IMAGE_SIZE // 4  # two 2x2 poolings
        self.fc1 = Dense(64 * side * side, 1024)
        self.dropout = Dropout(p=1.0 - keep_prob)
        self.out = Dense(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        # Pooling before ReLU gives the same values and gradients as after, on a quarter of
        # the elements.
        x = F.max_pool2d(self.conv1(x), 2).relu_()  # (B, 32, 14, 14)
        x = F.max_pool2d(self.conv2(x), 2).relu_()  # (B, 64, 7, 7)
        # Flatten in (H, W, C) order, as the post's NHWC reshape did; for a channels-last
        # tensor this is a view, not a copy.
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, 3136)
        x = self.dropout(self.fc1(x).relu_())  # (B, 1024)
        return self.out(x)  # (B, classes)


@register_model("post", "the post's ConvNet: conv5x5-32, conv5x5-64, dense 1024, dropout")
def post(num_classes: int = NUM_CLASSES, keep_prob: float = 0.75) -> nn.Module:
    return PostNet(num_classes, keep_prob)


class PostBNNet(PostNet):
    """The post's network with batch normalisation after each convolution and the dense layer
    (their biases dropped: the normalisation's shift replaces them)."""

    def __init__(self, num_classes: int = NUM_CLASSES, keep_prob: float = 0.75):
        super().__init__(num_classes, keep_prob)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2, bias=False)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2, bias=False)
        self.fc1 = Dense(self.fc1.in_features, 1024, bias=False)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(32), nn.BatchNorm2d(64), nn.BatchNorm1d(1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = F.max_pool2d(self.bn1(self.conv1(x)), 2).relu_()  # (B, 32, 14, 14)
        x = F.max_pool2d(self.bn2(self.conv2(x)), 2).relu_()  # (B, 64, 7, 7)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, 3136)
        x = self.dropout(self.bn3(self.fc1(x)).relu_())  # (B, 1024)
        return self.out(x)


@register_model("post-bn", "the post's ConvNet with batch normalisation")
def post_bn(num_classes: int = NUM_CLASSES, keep_prob: float = 0.75) -> nn.Module:
    return PostBNNet(num_classes, keep_prob)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def conv_pool_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, 2x2 max-pooling, batch norm, ReLU: the normalisation and the ReLU on a
    quarter of the elements."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FastNet(nn.Module):
    """A small network for CPUs: one cheap convolution at 28x28, the rest at 14x14 and 7x7,
    with a residual pair of convolutions at 7x7 and a max-pooled head. With `pool_first`, the
    two downsampling convolutions pool before their batch norm and ReLU (`conv_pool_bn`)."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128),
                 pool_first: bool = False):
        super().__init__()
        c1, c2, c3 = widths
        if pool_first:
            self.stem, self.layer1 = conv_pool_bn(1, c1), conv_pool_bn(c1, c2)
        else:
            self.stem = nn.Sequential(conv_bn(1, c1), nn.MaxPool2d(2))  # (B, c1, 14, 14)
            self.layer1 = nn.Sequential(conv_bn(c1, c2), nn.MaxPool2d(2))  # (B, c2, 7, 7)
        self.layer2 = conv_bn(c2, c3)  # (B, c3, 7, 7)
        self.res = nn.Sequential(conv_bn(c3, c3), conv_bn(c3, c3))  # (B, c3, 7, 7)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = self.layer2(self.layer1(self.stem(x)))
        x = x + self.res(x)
        x = torch.amax(x, dim=(2, 3))  # (B, c3)
        return self.head(x)


@register_model("fast", "a small residual network designed for CPU training speed")
def fast(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128)) -> nn.Module:
    return FastNet(num_classes, tuple(widths))


@register_model("fast2", "the fast network pooling before normalising: the same work in 15% less time")
def fast2(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (32, 64, 128)) -> nn.Module:
    return FastNet(num_classes, tuple(widths), pool_first=True)


class WideBlock(nn.Module):
    """Pre-activation residual block of a wide ResNet (BN-ReLU-conv twice)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis) for 28x28 inputs: three stages at 28, 14 and 7
    pixels with 16k, 32k and 64k channels."""

    def __init__(self, depth: int, k: int, num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("wide ResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        blocks = []
        for stage, stride in enumerate((1, 2, 2)):
            c_in, c_out = widths[stage], widths[stage + 1]
            blocks += [WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n)]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28)
        x = self.blocks(self.stem(x))  # (B, 64k, 7, 7)
        x = F.relu(self.bn(x)).mean(dim=(2, 3))  # (B, 64k)
        return self.head(x)


@register_model("wrn-16-4", "wide ResNet, depth 16, width 4")
def wrn_16_4(num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 4, num_classes, dropout)


@register_model("wrn-28-10", "wide ResNet, depth 28, width 10 (the dataset's top table entries)")
def wrn_28_10(num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, num_classes, dropout)
