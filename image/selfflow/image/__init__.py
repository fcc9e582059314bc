"""selfflow.image."""
