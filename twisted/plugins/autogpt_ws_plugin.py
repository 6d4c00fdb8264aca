from twisted.application.service import ServiceMaker

autogpt_ws = ServiceMaker("autogpt-ws", "autogpt_ws.tap", "The AutoGPT real-time WebSocket server.", "autogpt-ws")
