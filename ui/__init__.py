"""The Gradio app (`loratrain ui`): a page per tool, each calling the same jobs as the CLI, each job in its own process."""
