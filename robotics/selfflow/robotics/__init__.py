"""selfflow.robotics."""
