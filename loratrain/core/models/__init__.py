"""Model families, loading (diffusers folders, single files, HF cache), key layouts, tiny models."""
