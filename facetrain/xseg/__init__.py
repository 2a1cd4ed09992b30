"""XSeg: hand-labelled face masks, a segmenter trained on them, and its masks applied to a faceset."""
