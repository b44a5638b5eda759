"""The feature store: finished HDF5 caches, resumable partial ones, and fitted heads."""
