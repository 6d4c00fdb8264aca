"""The routing core: the protocol as bytes (wire), who holds what (hub), bus message -> frames
(router), one socket's frames (session), channel names, catch-up.  No I/O, no Autobahn."""
