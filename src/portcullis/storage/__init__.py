"""Storage protocols and their backends. Backends import only the protocols."""
