"""Models: loading (hub, local dirs, built-in test models) and architecture facts."""
