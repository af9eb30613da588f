"""Whole-slide tiling, dataset packing and featurizing (knows slides and shards, never models)."""
