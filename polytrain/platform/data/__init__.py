"""Data: manifests, datasets, packing, the data order (a pure function of seed and slot), the loader, built-in data."""
