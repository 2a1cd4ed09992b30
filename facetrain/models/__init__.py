"""DF and LIAE autoencoders (DeepFakeArchi) with the -u, -d, -t and -c modifiers."""
