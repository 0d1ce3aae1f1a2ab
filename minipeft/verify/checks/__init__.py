"""Registered checks, one module per topic; every module here is imported by ``collect``."""
