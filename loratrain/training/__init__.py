"""The LoRA training loop and its helpers (noise, loss weights, optimizers, saving, sampling)."""
