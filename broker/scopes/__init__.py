"""Scope template files: loading, linting, schema and parameter rendering."""
