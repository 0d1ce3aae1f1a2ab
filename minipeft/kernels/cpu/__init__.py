"""minipeft.kernels.cpu."""
