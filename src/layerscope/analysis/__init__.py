"""Analysis over a finished store: summaries and run cost estimates."""
