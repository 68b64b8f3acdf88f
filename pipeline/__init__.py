"""cnncodes: frozen CNN codes in an HDF5 cache, scikit-learn heads, optional fine-tuning."""

__version__ = "0.1.0"

from . import lean_imports  # noqa: E402  (before anything imports scikit-learn)

lean_imports.install()
