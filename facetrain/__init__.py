"""Face autoencoder (DF/LIAE) and swap path: see issue 6; not built yet."""
