"""selfflow.video."""
