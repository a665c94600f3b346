"""Integrations with other libraries (optional dependencies are imported lazily)."""
