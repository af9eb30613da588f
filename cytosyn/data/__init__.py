"""Data loading for training: the sharded split loader (see docs/loader.md)."""

from cytosyn.data.loader import LoaderConfig, LoaderStats, TrainLoader, build_loader

__all__ = ["LoaderConfig", "LoaderStats", "TrainLoader", "build_loader"]
