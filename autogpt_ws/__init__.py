"""autogpt-ws: the real-time WebSocket server of the AutoGPT platform,
as a Twisted/Autobahn daemon.  Data flows one way: bus -> router -> hub ->
socket; docs/design.md has the design."""

__version__ = "0.1.0"
