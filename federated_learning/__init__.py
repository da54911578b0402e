"""Federated learning backend: services over a Redis bus, pure logic beside them."""

__version__ = "0.1.0"
