"""thinkling: post-training small language models to reason."""

__version__ = "0.1.0"
