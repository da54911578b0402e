"""A plain-HTTP bot with its own model layout (see README.md)."""
