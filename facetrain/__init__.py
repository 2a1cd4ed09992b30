"""Face autoencoder in the DeepFaceLab SAEHD tradition: extraction, aligned facesets, DF / LIAE training.

Faces of real people are involved: use only faces whose owners consented. Outputs of the swap path
are labelled as AI-generated.
"""

CONSENT = "Use only faces of people who have given their consent."
