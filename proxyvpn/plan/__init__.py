"""The plan: pure functions from configuration and host facts to operations."""
