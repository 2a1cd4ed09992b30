"""Dataset tools (WD14 tagger, tag editor, repeat folders, quality checks): see issue 3; not built yet."""
