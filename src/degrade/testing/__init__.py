"""Outage simulation for tests: a fault-injecting TCP proxy and pytest fixtures."""
