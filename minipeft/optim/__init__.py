"""minipeft.optim."""
