"""The `portcullis demo` pieces: a self-contained gateway in front of a built-in demo SaaS API.

`portcullis.demo.upstream` holds the demo SaaS API (a plain ASGI app) and helpers to serve it with
uvicorn in a background thread. Nothing is imported here, so importing the package stays cheap.
"""
