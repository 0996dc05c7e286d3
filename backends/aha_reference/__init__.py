"""The ``reference`` backend: the NumPy float64 spec (aha.reference) served as a backend."""
