"""gradmm: synthetic text whose training gradient matches a (private) released target (GRADMM)."""

__version__ = "0.1.0"
