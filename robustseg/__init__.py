"""robustseg."""
