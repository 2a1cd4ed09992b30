"""Dataset preparation: WD14 tagging, caption editing with undo, repeat folders, quality checks, video frames.

Every function here is what the CLI (`loratrain tag|tags|dataset`) and the UI call; none of them
prints directly (they take a Reporter), and every file they change is written atomically.
"""
