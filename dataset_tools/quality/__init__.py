"""`loratrain dataset check`: per-image measurements, a registry of checks over them, and quarantine."""
