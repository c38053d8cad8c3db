"""MiniGPT-4: a frozen vision encoder joined to a frozen large language model by one trained projection."""

__version__ = "0.1.0"
