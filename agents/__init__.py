"""Agents: the client runtime, built-in trainers, data splits and the simulation."""
