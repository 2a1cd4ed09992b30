"""Streaming checkpoint merge and LoRA bake/extract: see issue 4; not built yet."""
