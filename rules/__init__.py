"""guardproxy rules package."""
