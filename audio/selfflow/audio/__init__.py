"""selfflow.audio."""
