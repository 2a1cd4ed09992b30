"""XY(Z) grid sampling on the trainer's model loading and sampling code."""
