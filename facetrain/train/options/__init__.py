"""`face train`'s option groups beyond SAEHD's own (which stay in train/config.py): one class per feature, each
with its own checks, inherited by FaceTrainConfig, so a feature's options live beside nothing else's."""
