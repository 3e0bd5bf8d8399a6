"""Transport: the only importer of ``websockets`` (and, later, the HTTP library)."""
