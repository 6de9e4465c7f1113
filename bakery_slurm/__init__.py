"""bakery-slurm: bake LoRA adapters into bases, merge them with mergekit, push one Hub subfolder per cell."""

__version__ = "0.1.0"
