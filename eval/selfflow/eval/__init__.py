"""selfflow.eval."""
