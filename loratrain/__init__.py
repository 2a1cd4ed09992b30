"""loratrain: LoRA/LoCon training for SD1/SD2/SDXL, dataset tools, merging and a face autoencoder."""

__version__ = "0.1.0"
