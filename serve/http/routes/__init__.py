"""Thin FastAPI routers: parse, authorise, delegate to the serving logic, shape the response."""
