"""Identity-injection face swapping (the inswapper / SimSwap family): 5-point alignment, recogniser, generator, training."""
