"""Adapters that put topkphi inside model libraries; they depend on backends, never the reverse."""
