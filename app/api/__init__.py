"""HTTP routers. ``app.main.create_app`` includes them: health and metrics are open, the /v1 routes
and the /predict alias require the API key when ``EMOTION_API_KEYS`` is set."""
