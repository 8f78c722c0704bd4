"""The stages of the request path, each with its config model beside its handler."""
