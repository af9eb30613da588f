"""SLURM and torchrun launchers."""
