"""progressive: train one model through a curriculum of Slurm jobs that survive time limits."""

__version__ = "0.1.0"
