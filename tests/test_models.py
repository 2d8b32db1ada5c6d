import pytest
import torch
import torch.nn.functional as F

from fmnist import FmnistError
from fmnist.config import TrainConfig
from fmnist.models import (
    build_model,
    count_parameters,
    flops_per_image,
    init_weights,
    layers,
    model_names,
)
from fmnist.models.layers import Conv2d, Dense, Dropout


@pytest.mark.parametrize("name", model_names())
def test_every_model_shape_no_nan_and_learns(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 10
    out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert count_parameters(model) > 0 and flops_per_image(model) > 0


def reference_post_forward(model, x):
    """The post's network written the plain way: ReLU before pooling, TF's NHWC flatten."""
    x = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=2)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, model.conv2.weight, model.conv2.bias, padding=2)), 2)
    x = x.permute(0, 2, 3, 1).reshape(len(x), -1)
    x = F.relu(F.linear(x, model.fc1.weight, model.fc1.bias))
    return F.linear(x, model.out.weight, model.out.bias)


@pytest.mark.parametrize("channels_last", [False, True])
def test_post_matches_plain_formulation(channels_last):
    torch.manual_seed(0)
    model = build_model("post").eval()
    x = torch.randn(4, 1, 28, 28)
    expected = reference_post_forward(model, x)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_is_linear_with_its_products_in_onednn(bias):
    torch.manual_seed(0)
    dense, linear = Dense(300, 40, bias=bias), torch.nn.Linear(300, 40, bias=bias)
    linear.load_state_dict(dense.state_dict())  # the same parameters, the same names
    assert dense.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(16, 300, requires_grad=True)
    y, expected = dense(x), linear(x)
    if torch.backends.mkldnn.is_available():
        assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"  # the fast path was taken
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    params = [x, dense.weight] + ([dense.bias] if bias else [])
    ref_params = [x, linear.weight] + ([linear.bias] if bias else [])
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, ref_params, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an optimiser changes the weights in place: nothing may be cached
        dense.weight.mul_(-2)
        linear.weight.mul_(-2)
    torch.testing.assert_close(dense(x), linear(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast takes nn.Linear's path
        assert dense(x).dtype == torch.bfloat16
    assert flops_per_image(torch.nn.Sequential(torch.nn.Flatten(), Dense(784, 10))) == 2 * 784 * 10


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_is_nn_conv2d_with_its_bias_gradient_summed(channels_last):
    torch.manual_seed(0)
    conv, ref = Conv2d(3, 8, kernel_size=5, padding=2), torch.nn.Conv2d(3, 8, kernel_size=5, padding=2)
    ref.load_state_dict(conv.state_dict())  # the same parameters, the same names
    x = torch.randn(4, 3, 12, 12, requires_grad=True)
    if channels_last:
        conv, ref = conv.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y, expected = conv(x), ref(x)
    assert type(y.grad_fn).__name__ == "_ConvSumBiasBackward"  # the summed bias gradient was taken
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight, conv.bias], grad)
    want = torch.autograd.grad(expected, [x, ref.weight, ref.bias], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # No gradient asked of the input (a first layer): none computed, the others still right.
    w_only = torch.autograd.grad(conv(x.detach()), [conv.weight, conv.bias], grad)
    for g, w in zip(w_only, want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast takes nn.Conv2d's path
        assert conv(x).dtype == torch.bfloat16
    assert flops_per_image(torch.nn.Sequential(Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(2 * 784, 10))) \
        == 2 * 784 * 2 * 9 + 2 * 2 * 784 * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 300), (8, 5, 6, 7)])
def test_dropout_is_nn_dropout_to_the_bit(dtype, shape):
    ours, theirs = Dropout(0.25), torch.nn.Dropout(0.25)
    x = torch.randn(shape).to(dtype)
    if x.dim() == 4:  # the mask follows the memory layout, as torch's does
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    torch.manual_seed(3)
    got = ours(x)
    after_ours = torch.rand(5)
    torch.manual_seed(3)
    want = theirs(x)
    after_theirs = torch.rand(5)
    assert torch.equal(got, want)  # the same mask, the same scaling, the same rounding
    assert torch.equal(after_ours, after_theirs)  # and the generator where torch's leaves it
    assert 0.65 < (got != 0).float().mean() < 0.85
    grad = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])
    with torch.profiler.profile() as prof:
        ours(x)
    # Torch's Bernoulli sampler is skipped exactly where the uniform one draws its mask.
    assert ("aten::bernoulli_" in {e.name for e in prof.events()}) != layers._uniform_draws_torchs_dropout_mask()
    assert torch.equal(ours.eval()(x), x)


def test_post_sizes_are_the_posts():
    model = build_model("post")
    assert model.conv1.weight.shape == (32, 1, 5, 5)
    assert model.conv2.weight.shape == (64, 32, 5, 5)
    assert model.fc1.weight.shape == (1024, 7 * 7 * 64)
    assert model.out.weight.shape == (10, 1024)
    assert model.dropout.p == pytest.approx(0.25)
    assert count_parameters(model) == 3_274_634


def test_normal_init_is_standard_normal():
    torch.manual_seed(0)
    model = build_model("post")
    init_weights(model, "normal")
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.mean().abs() < 0.01 and (weights.std() - 1).abs() < 0.01
    assert model.conv1.bias.std() > 0.5  # biases are drawn too, not zeroed
    default = build_model("post")
    assert default.fc1.weight.std() < 0.05  # PyTorch's default is far narrower
    with pytest.raises(FmnistError, match="unknown init 'xavier'; choose from: default, normal"):
        TrainConfig(init="xavier").validate()  # a user's choice is checked before any network exists
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        init_weights(model, "xavier")


def test_unknown_model_names_the_choices():
    with pytest.raises(FmnistError, match="unknown model 'nope'; choose from: post"):
        build_model("nope")
