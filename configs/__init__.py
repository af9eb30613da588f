"""YAML presets, installed as ``cytosyn.configs`` so the demo and users can read them from any install."""
