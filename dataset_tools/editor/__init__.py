"""Caption editing over a whole dataset: the library behind `loratrain tags` and the UI's tag editor."""
