"""The swap path: put a trained face onto frames and video, labelled as AI-generated."""
