"""Face extraction: detector and landmarker plugins, and the extract / sort commands built on them."""
