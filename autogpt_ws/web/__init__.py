"""The HTTP side of the one port: the front door, health, ready, metrics, CORS, and the bounds on
every request."""
