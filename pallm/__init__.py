"""PALLM: teach speech LLMs to hear *how* something is said."""

__version__ = "0.1.0"
