"""Pure round logic: training state, agent selection, round decisions. No I/O."""
