"""headfleet: one frozen backbone, a content-hash embedding cache, many tenant heads.

The subpackages live in the repository's top-level folders (embedder/, cache/, heads/,
kernels/, service/) and are mapped here by setuptools ``package-dir``. This package holds only
what every layer may import: the version, the settings and the domain errors.
"""

__version__ = "0.1.0"
