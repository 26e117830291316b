"""The OpenAI-compatible HTTP server: wire types, routes, serving handlers."""
