"""cupyx.scipy for the strict CuPy stand-in (tests only)."""
