"""One module per process; each a thin shell: read from the bus, call pure logic, write."""
