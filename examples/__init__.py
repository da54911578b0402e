"""Example user code that the agent runtime drives."""
