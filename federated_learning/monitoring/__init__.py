"""Pure monitoring logic: alert rules and their lifecycle. No I/O."""
