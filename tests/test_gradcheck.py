"""gradcheck and gradgradcheck in float64 on tiny shapes, for every op, on the Triton backend (the
interpreter on a CPU machine), the CUDA C++ backend where it runs, and the pure-PyTorch backend.

Double backward, by op and backend:

* residual_add: supported everywhere (its backward ops, the ReLU mask and the option-A adjoint,
  are linear in the gradient and carry their own autograd formulas).
* conv2d and conv_bn_relu in eval mode (a conv2d with folded weights): supported everywhere. The
  backward ops (cnnkern::conv2d_backward_input/_weight) are bilinear and carry formulas: dgrad's
  derivatives are a conv2d and a wgrad, wgrad's a conv2d (plus the bias) and a dgrad.
* conv_bn_relu in training mode (kernel backends): not supported: the fused BatchNorm backward op
  (cnnkern::conv_bn_relu_backward) has no derivative; the error names it.
* local_response_norm (kernel backends): not supported, by design: the one-pass backward kernel
  recomputes the window sums and has no derivative kernel; the error names
  cnnkern.local_response_norm_backward.
* The "torch" backend is PyTorch's own autograd: double backward works for every op.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, backends_for
from torch.autograd import gradcheck, gradgradcheck

from cnnkern import functional as F

D = torch.float64


def _r(*shape, positive=False):
    t = torch.rand(shape, dtype=D, device=DEVICE) + 0.5 if positive else torch.randn(shape, dtype=D, device=DEVICE)
    return t.requires_grad_()


def _cases(backend):
    """name -> (fn, inputs, double backward supported on this backend)"""
    kernel = backend != "torch"
    x, w, b = _r(1, 2, 4, 4), _r(4, 2, 3, 3), _r(4)
    xg, wg = _r(1, 4, 3, 3), _r(4, 2, 2, 2)
    gamma, beta = _r(4, positive=True), _r(4)
    rm, rv = torch.randn(4, dtype=D, device=DEVICE), torch.rand(4, dtype=D, device=DEVICE) + 0.5
    xs, ss = _r(1, 4, 2, 3), _r(1, 2, 4, 5)
    return {
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, backend=backend), (x, w, b), True),
        "conv2d-groups-dilation-relu": (
            lambda x, w: F.conv2d(x, w, padding=1, dilation=2, groups=2, activation="relu", backend=backend),
            (xg, wg),
            True,
        ),
        "conv_bn_relu-train": (
            lambda x, w, g, bt: F.conv_bn_relu(
                x, w, None, None, None, g, bt, training=True, padding=1, relu=False, backend=backend
            ),
            (x, w, gamma, beta),
            not kernel,
        ),
        "conv_bn_relu-eval": (
            lambda x, w, b, g, bt: F.conv_bn_relu(x, w, b, rm, rv, g, bt, training=False, padding=1, backend=backend),
            (x, w, b, gamma, beta),
            True,
        ),
        "local_response_norm": (
            lambda x: F.local_response_norm(x, 3, alpha=0.5, k=1.5, backend=backend),
            (_r(1, 5, 2, 2),),
            not kernel,
        ),
        "local_response_norm-even-size": (
            lambda x: F.local_response_norm(x, 4, alpha=0.5, backend=backend),
            (_r(1, 5, 2, 1),),
            not kernel,
        ),
        "residual_add-identity": (lambda a, s: F.residual_add(a, s, backend=backend), (xs, _r(1, 4, 2, 3)), True),
        "residual_add-option-a": (lambda a, s: F.residual_add(a, s, backend=backend), (xs, ss), True),
        "residual_add-no-relu": (lambda a, s: F.residual_add(a, s, relu=False, backend=backend), (xs, ss), True),
    }


NAMES = list(_cases("torch"))
_OP = {n: n.split("-")[0] for n in NAMES}


def _params():
    out = []
    for name in NAMES:
        for p in backends_for(DEVICE, _OP[name]):
            out.append(pytest.param(name, p.values[0], marks=p.marks, id=f"{name}-{p.values[0]}"))
    return out


@pytest.mark.parametrize("name,backend", _params())
def test_gradcheck(name, backend):
    fn, inputs, _ = _cases(backend)[name]
    # fast mode (random projections of the Jacobian) keeps the interpreter's share small; the
    # cheap elementwise op also gets the full Jacobian
    assert gradcheck(fn, inputs, fast_mode=True)
    if name.startswith("residual"):
        assert gradcheck(fn, inputs, fast_mode=False)


@pytest.mark.parametrize("name,backend", _params())
def test_gradgradcheck_or_clear_error(name, backend):
    fn, inputs, supported = _cases(backend)[name]
    if supported:
        assert gradgradcheck(fn, inputs, fast_mode=True)
        return
    # what gradgradcheck would do first: differentiate the gradient
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out), create_graph=True)
    with pytest.raises(
        RuntimeError,
        match=r"Trying to backward through cnnkern\.(conv_bn_relu_backward|"
        r"local_response_norm_backward)\.default but no "
        r"autograd formula was registered",
    ):
        sum(g.sum() for g in grads).backward()
