"""crs: the contrastive reward service."""

__version__ = "0.1.0"
