"""Face autoencoder in the DeepFaceLab SAEHD tradition: extraction, aligned facesets, DF / LIAE training.

Faces of real people are involved: use only faces whose owners consented. Outputs of the swap path
are labelled as AI-generated.
"""


def require_extras(*modules: str) -> None:
    """Fail with the install command when an optional face dependency is missing."""
    import importlib.util

    missing = [m for m in modules or ("cv2", "dlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the face tools need {', '.join(missing)}: pip install 'loratrain[face]'")
