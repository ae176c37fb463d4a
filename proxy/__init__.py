"""guardproxy proxy package."""
