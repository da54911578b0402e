"""Durable records in Redis (trainings, agents): typed reads and writes, no decisions."""
