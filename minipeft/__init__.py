"""minipeft: parameter-efficient fine-tuning from first principles, over NumPy.

Every equation lives three times, tied by one id: derived in ``derivations/``,
implemented in one function whose docstring names the id, and checked by a registered
check (``python -m minipeft verify``).
"""

from .autograd import Tensor, no_grad, tensor
from .backend import (
    BackendError,
    default_dtype,
    dtype_policy,
    get_backend,
    seed,
    set_backend,
    set_default_dtype,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Tensor",
    "__version__",
    "default_dtype",
    "dtype_policy",
    "get_backend",
    "no_grad",
    "seed",
    "set_backend",
    "set_default_dtype",
    "tensor",
]
