"""surgery: verify model surgery — moving trained weights across architectures."""

__version__ = "0.1.0"
