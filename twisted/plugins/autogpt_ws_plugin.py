"""twistd plugin: ``twistd [-n] autogpt-ws [options]`` (see autogpt_ws.running.tap).

This directory has no __init__.py, nor has twisted/: Twisted finds plugins in
every twisted/plugins directory on sys.path."""

from twisted.application.service import ServiceMaker

autogpt_ws = ServiceMaker("autogpt-ws", "autogpt_ws.running.tap", "The AutoGPT real-time WebSocket server.", "autogpt-ws")
