"""Pieces every command shares: config base, registry, progress/stop, safe file I/O.

They live here so that dataset_tools, merge, ui and facetrain import one implementation.
"""
