"""Names of the serving tests' session application (tests/serving/conftest.py starts it)."""

HTTP_PORT = 8150  # the session's Serve proxy; Ray metrics on 8151.. (head, then one per pool)
API_KEY = "test-key-123"  # the key of the "scripted" app (auth tests)
APP = "v4d"  # Serve application name of the real app
