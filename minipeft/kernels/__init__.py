"""minipeft.kernels."""
