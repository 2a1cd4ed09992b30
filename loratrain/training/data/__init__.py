"""kohya-style datasets: repeat folders, dataset TOML, captions, buckets, latent cache, step plan."""
