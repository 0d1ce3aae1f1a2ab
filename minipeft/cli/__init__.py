"""Subcommands of ``python -m minipeft``: each module here defines ``register(subparsers)``."""
