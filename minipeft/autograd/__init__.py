"""The autograd engine: Tensor, Function, the differentiable ops and gradcheck."""

from . import ops
from .gradcheck import GradcheckResult, gradcheck, numerical_grad, rel_error
from .ops import (
    add,
    astype,
    concat,
    cross_entropy,
    div,
    dropout,
    embedding,
    exp,
    gelu,
    getitem,
    layer_norm,
    log,
    log_softmax,
    masked_fill,
    matmul,
    max,
    mean,
    mul,
    neg,
    pow,
    relu,
    reshape,
    sigmoid,
    softmax,
    sqrt,
    stack,
    sub,
    sum,
    tanh,
    transpose,
    var,
    where,
)  # fmt: skip
from .tensor import Function, Tensor, _bind_ops, as_tensor, is_grad_enabled, no_grad, tensor

_bind_ops(ops)  # Tensor's operators (+, *, @, .sum(), …) call these ops, bound once

__all__ = [
    "Function", "GradcheckResult", "Tensor", "add", "as_tensor", "astype", "concat",
    "cross_entropy", "div", "dropout", "embedding", "exp", "gelu", "getitem", "gradcheck",
    "is_grad_enabled", "layer_norm", "log", "log_softmax", "masked_fill", "matmul", "max",
    "mean", "mul", "neg", "no_grad", "numerical_grad", "ops", "pow", "rel_error", "relu",
    "reshape", "sigmoid", "softmax", "sqrt", "stack", "sub", "sum", "tanh", "tensor",
    "transpose", "var", "where",
]  # fmt: skip
