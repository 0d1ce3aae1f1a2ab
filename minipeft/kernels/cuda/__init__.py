"""minipeft.kernels.cuda."""
