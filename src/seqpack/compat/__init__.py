"""Compatibility layers for code written against other frameworks (InternEvo's manual-adaptation API)."""
