"""A training engine for transformer language models, driven by Hugging Face Accelerate."""

__version__ = "0.1.0"
