"""fssmeta: few-shot semantic segmentation meta-learning under one exact protocol."""

__version__ = "0.1.0"
