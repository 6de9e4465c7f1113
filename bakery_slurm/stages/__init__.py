"""The stages of one cell: bake -> merge -> strip -> verify -> push (sequenced by pipeline.py)."""
