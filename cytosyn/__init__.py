"""cytosyn: latent-diffusion foundation models for H&E histopathology."""

__version__ = "0.1.0"
