"""Web output: the self-contained dashboard page."""
