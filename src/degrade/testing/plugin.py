"""pytest plugin (placeholder until the fault proxy lands)."""
