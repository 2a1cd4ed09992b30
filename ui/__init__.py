"""Gradio app over the library functions: not built yet."""
