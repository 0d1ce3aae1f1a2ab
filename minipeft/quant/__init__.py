"""minipeft.quant."""
