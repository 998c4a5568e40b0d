"""The HTTP API (FastAPI). ``broker.api.app.create_app(settings)`` builds everything."""
