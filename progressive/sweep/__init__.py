"""Sweeps: many variants of one curriculum, each its own run, run as Slurm job arrays (or locally)."""
