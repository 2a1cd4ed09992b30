"""`loratrain face train`: the SAEHD-style training loop and what it needs (data, discriminators, saves)."""
