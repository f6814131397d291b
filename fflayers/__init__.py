"""fflayers: feed-forward layers of transformer language models, opened up."""

__version__ = "0.1.0"
