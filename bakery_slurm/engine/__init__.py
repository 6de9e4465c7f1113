"""The bakery merge engine: one pass from the base and the adapters' LoRA factors to the merged
checkpoint, without writing baked checkpoints (see `cell` for how, `lora` for what it refuses)."""

from .cell import CellPlan, plan_cell, run_plan
from .lora import Unsupported

__all__ = ["CellPlan", "Unsupported", "plan_cell", "run_plan"]
