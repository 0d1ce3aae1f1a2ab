"""minipeft.models."""
