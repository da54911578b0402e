"""Redis plumbing: connections with retry, consumer loops, blob store, embedded server."""
