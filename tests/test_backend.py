"""The backend chooses the array namespace and the dtype policy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import minipeft
from minipeft import backend


def test_numpy_is_the_default():
    assert minipeft.get_backend() == "numpy"
    assert backend.xp() is np
    assert backend.xp_of(np.zeros(2), 1.0) is np


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend: expected 'numpy' or 'cupy', got 'jax'"):
        minipeft.set_backend("jax")


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="CuPy is installed on this machine"
)
def test_cupy_missing_is_a_clear_error():
    with pytest.raises(minipeft.BackendError, match="CuPy is not installed"):
        minipeft.set_backend("cupy")
    assert minipeft.get_backend() == "numpy"


def test_dtype_policy_restores_the_default():
    assert minipeft.default_dtype() == np.float32
    with minipeft.dtype_policy("float64"):
        assert minipeft.tensor([1.0, 2.0]).dtype == np.float64
    assert minipeft.tensor([1.0, 2.0]).dtype == np.float32
    with pytest.raises(TypeError, match="dtype"):
        minipeft.set_default_dtype("int32")


def test_seed_makes_initialization_reproducible():
    from minipeft.nn import Linear

    minipeft.seed(7)
    a = Linear(4, 3).weight.data.copy()
    minipeft.seed(7)
    b = Linear(4, 3).weight.data.copy()
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        minipeft.seed(-1)
