"""pizoo: extend the context window of RoPE language models and ship the result everywhere."""

__version__ = "0.1.0"
