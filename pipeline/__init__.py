"""cnncodes: frozen CNN codes in an HDF5 cache, scikit-learn heads, optional fine-tuning."""

__version__ = "0.1.0"
