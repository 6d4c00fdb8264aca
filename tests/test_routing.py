"""Routing of section 4 over real sockets, through the embedded bus:
bus -> router -> hub -> socket (issue 3, points 3, 4 and 7).

Events enter as producers publish them, (channel, envelope bytes), on the
memory bus, which delivers synchronously: anything a socket would get from
a publish is written before a heartbeat sent afterwards is even read, so
"the next message is the pong" proves that nothing was pushed."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from autogpt_ws.producing import publish
from autogpt_ws.running.service import WebsocketServer
from tests.helpers import SECRET, Client, U, connect, padded, start_server, token, wait_for

PING = b'{"method":"heartbeat","data":"ping","success":true}'
PONG = b'{"method":"heartbeat","data":"pong","success":true}'


def push_frame(method: str, key: str | None, event: bytes) -> bytes:
    channel = b"null" if key is None else json.dumps(key, ensure_ascii=False).encode()
    return (b'{"method":"' + method.encode() + b'","data":' + event
            + b',"success":null,"channel":' + channel + b',"error":null}')


def exec_key(user: str, ident: str) -> str:
    return f"{user}|graph_exec#{ident}"


def graph_key(user: str, ident: str) -> str:
    return f"{user}|graph#{ident}|executions"


def graph_event_bytes(user: str, graph: str, ident: str, status: str = "RUNNING", **extra: Any) -> bytes:
    return json.dumps(publish.graph_event(user, graph, ident, status, **extra),
                      separators=(",", ":"), ensure_ascii=False).encode()


def node_event_bytes(user: str, graph: str, ident: str, node_exec: str = "ne1", **extra: Any) -> bytes:
    return json.dumps(publish.node_event(user, graph, ident, node_exec, "RUNNING", **extra),
                      separators=(",", ":"), ensure_ascii=False).encode()


def envelope(event: bytes) -> bytes:
    return b'{"payload":' + event + b"}"


class Routing(TestCase):
    def server(self, **overrides: Any) -> WebsocketServer:
        # catch-up (an extension with its own tests) off unless a test asks:
        # here every event reaches sockets live
        overrides.setdefault("catchup_enabled", False)
        overrides.setdefault("rate_limit", 0)
        return start_server(self, **overrides)

    def exec_channel(self, server: WebsocketServer, user: str, graph: str, ident: str) -> str:
        return server.layout.classic_exec(user, graph, ident)

    @inlineCallbacks
    def client(self, server: WebsocketServer, *subscriptions: tuple[str, str], user_token: str | None = None) -> Any:
        """A socket with these subscriptions: ("exec", id) or ("graph", id)."""
        client = yield connect(server.port, token=user_token, test=self)
        for kind, ident in subscriptions:
            if kind == "exec":
                frame = {"method": "subscribe_graph_execution", "data": {"graph_exec_id": ident}}
            else:
                frame = {"method": "subscribe_graph_executions", "data": {"graph_id": ident}}
            reply = yield client.request(json.dumps(frame))
            self.assertEqual(json.loads(reply)["success"], True, reply)
        client.replies = len(client.messages)  # type: ignore[attr-defined]
        return client

    @inlineCallbacks
    def pushed(self, *clients: Client) -> Any:
        """What each client got since its subscriptions, up to a pong that
        proves nothing else is on the way."""
        result = []
        for client in clients:
            start = getattr(client, "replies", 0)
            client.send(PING)
            index = start
            while True:  # pushes may still be in flight ahead of the pong
                message = yield client.message(index)
                if message == PONG:
                    break
                index += 1
            got = client.messages[start:]
            self.assertEqual(got[-1], PONG)
            self.assertNotIn(PONG, got[:-1])
            result.append(got[:-1])
            client.replies = len(client.messages)  # type: ignore[attr-defined]
        return result

    # -- section 4 table ----------------------------------------------------

    @inlineCallbacks
    def test_graph_event_to_exec_key_and_graph_key(self) -> Any:
        server = self.server()
        on_exec = yield self.client(server, ("exec", "e1"))
        on_graph = yield self.client(server, ("graph", "g1"))
        other_exec = yield self.client(server, ("exec", "e2"))
        other_graph = yield self.client(server, ("graph", "g2"))
        nothing = yield self.client(server)
        event = graph_event_bytes(U, "g1", "e1")
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(event))
        got = yield self.pushed(on_exec, on_graph, other_exec, other_graph, nothing)
        self.assertEqual(got, [
            [push_frame("graph_execution_event", exec_key(U, "e1"), event)],
            [push_frame("graph_execution_event", graph_key(U, "g1"), event)],
            [], [], [],
        ])

    @inlineCallbacks
    def test_node_event_to_exec_key_only(self) -> Any:
        server = self.server()
        on_exec = yield self.client(server, ("exec", "e1"))
        on_graph = yield self.client(server, ("graph", "g1"))
        event = node_event_bytes(U, "g1", "e1")
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(event))
        got = yield self.pushed(on_exec, on_graph)
        self.assertEqual(got, [[push_frame("node_execution_event", exec_key(U, "e1"), event)], []])

    @inlineCallbacks
    def test_both_keys_get_a_graph_event_twice(self) -> Any:
        server = self.server()
        both = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        event = graph_event_bytes(U, "g1", "e1", "COMPLETED")
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(event))
        node = node_event_bytes(U, "g1", "e1")
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(node))
        (got,) = yield self.pushed(both)
        self.assertEqual(sorted(got[:2]), sorted([
            push_frame("graph_execution_event", exec_key(U, "e1"), event),
            push_frame("graph_execution_event", graph_key(U, "g1"), event),
        ]))
        self.assertEqual(got[2:], [push_frame("node_execution_event", exec_key(U, "e1"), node)])

    @inlineCallbacks
    def test_subscribing_twice_delivers_once(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"), ("exec", "e1"))
        event = node_event_bytes(U, "g1", "e1")
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(event))
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [push_frame("node_execution_event", exec_key(U, "e1"), event)])

    @inlineCallbacks
    def test_unsubscribe_stops_delivery(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        yield client.request(b'{"method":"unsubscribe","data":{"graph_exec_id":"e1"}}')
        yield client.request(b'{"method":"unsubscribe","data":{"graph_id":"g1"}}')
        client.replies = len(client.messages)  # type: ignore[attr-defined]
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(graph_event_bytes(U, "g1", "e1")))
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [])
        self.assertEqual(server.hub.stats()["keys"], 0)

    @inlineCallbacks
    def test_notifications_to_every_socket_of_the_user(self) -> Any:
        server = self.server(enable_auth=True, jwt_verify_key=SECRET)
        first = yield self.client(server, ("exec", "e1"), user_token=token("alice"))
        second = yield self.client(server, user_token=token("alice"))
        other = yield self.client(server, user_token=token("bob"))
        inner = '{ "type" : "agent_run",  "event":"Готово ☃", "extra":{"n":1.50,"esc":"\\u00e9\\n"} }'.encode()
        data = b'{"payload":{"user_id":"alice","payload":' + inner + b"}}"
        yield server.bus.publish(server.layout.notification("alice"), data)
        got = yield self.pushed(first, second, other)
        frame = push_frame("notification", None, inner)
        self.assertEqual(frame, b'{"method":"notification","data":' + inner
                         + b',"success":null,"channel":null,"error":null}')
        self.assertEqual(got, [[frame], [frame], []])

    @inlineCallbacks
    def test_notification_with_the_publish_helper(self) -> Any:
        server = self.server()
        client = yield self.client(server)
        event = publish.notification(U, "agent_run", "done", graph_id="g1")
        yield publish.publish_notification(server.bus, server.layout, event)
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [b'{"method":"notification","data":{"type":"agent_run","event":"done","graph_id":"g1"},'
                               b'"success":null,"channel":null,"error":null}'])

    # -- isolation ------------------------------------------------------------

    @inlineCallbacks
    def cross_user(self, server: WebsocketServer) -> Any:
        alice = yield self.client(server, ("exec", "same"), ("graph", "g"), user_token=token("alice"))
        bob = yield self.client(server, ("exec", "same"), ("graph", "g"), user_token=token("bob"))
        a_event = graph_event_bytes("alice", "g", "same", "RUNNING", note="for alice")
        b_event = node_event_bytes("bob", "g", "same", note="for bob")
        yield server.bus.publish(self.exec_channel(server, "alice", "g", "same"), envelope(a_event))
        yield server.bus.publish(self.exec_channel(server, "bob", "g", "same"), envelope(b_event))
        # a producer naming another user inside the event than on its channel
        yield server.bus.publish(self.exec_channel(server, "alice", "g", "same"),
                                 envelope(graph_event_bytes("bob", "g", "same")))
        yield server.bus.publish(self.exec_channel(server, "bob", "g", "same"),
                                 envelope(node_event_bytes("alice", "g", "same")))
        yield server.bus.publish(server.layout.notification("bob"),
                                 b'{"payload":{"user_id":"alice","payload":{"type":"t","event":"e"}}}')
        got_alice, got_bob = yield self.pushed(alice, bob)
        self.assertEqual(sorted(got_alice), sorted([
            push_frame("graph_execution_event", exec_key("alice", "same"), a_event),
            push_frame("graph_execution_event", graph_key("alice", "g"), a_event),
        ]))
        self.assertEqual(got_bob, [push_frame("node_execution_event", exec_key("bob", "same"), b_event)])
        self.assertEqual(server.stats.events_dropped["channel_mismatch"], 3)
        # a late subscriber (catch-up, when on, replays only the user's own)
        late_bob = yield self.client(server, ("exec", "same"), ("graph", "g"), user_token=token("bob"))
        (got_late,) = yield self.pushed(late_bob)
        self.assertNotIn(b"alice", b"".join(got_late))

    @inlineCallbacks
    def test_cross_user_isolation(self) -> Any:
        server = self.server(enable_auth=True, jwt_verify_key=SECRET)
        yield self.cross_user(server)

    @inlineCallbacks
    def test_cross_user_isolation_with_default_settings(self) -> Any:
        server = start_server(self, enable_auth=True, jwt_verify_key=SECRET)
        self.assertTrue(server.settings.catchup_enabled)
        yield self.cross_user(server)

    # -- byte for byte ----------------------------------------------------------

    @inlineCallbacks
    def test_events_forwarded_byte_for_byte(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        node = ('{ "event_type" : "node_execution_update","user_id":"%s" ,  "graph_id":"g1",\n'
                '"graph_exec_id":"e1", "output_data":{"text":["héllo ☃ 😀","\\u00e9\\"\\\\"]},'
                '"n":1.50,"big":1e3,"neg":-0.0,"null":null,"nested":{ "a" : [ ] } }' % U).encode()
        graph = ('{"id":"e1","user_id":"%s","graph_id":"g1","stats":{"cost":0.10},'
                 '"name":"日本語","event_type":"graph_execution_update"}' % U).encode()
        channel = self.exec_channel(server, U, "g1", "e1")
        yield server.bus.publish(channel, b'{ "payload" : ' + node + b" }\n")
        yield server.bus.publish(channel, b'{"extra":1,"payload":' + graph + b',"more":[{"payload":2}]}')
        (got,) = yield self.pushed(client)
        self.assertEqual(got[0], push_frame("node_execution_event", exec_key(U, "e1"), node))
        self.assertEqual(sorted(got[1:]), sorted([
            push_frame("graph_execution_event", exec_key(U, "e1"), graph),
            push_frame("graph_execution_event", graph_key(U, "g1"), graph),
        ]))
        for frame in got:
            json.loads(frame)  # and each is JSON a browser can parse

    @inlineCallbacks
    def test_non_ascii_ids_in_channel_keys(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "é☃"))
        event = node_event_bytes(U, "g", "é☃")
        yield server.bus.publish(self.exec_channel(server, U, "g", "é☃"), envelope(event))
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [('{"method":"node_execution_event","data":%s,"success":null,'
                                '"channel":"%s|graph_exec#é☃","error":null}' % (event.decode(), U)).encode()])

    @inlineCallbacks
    def test_publish_helpers_compatible(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"))
        event = publish.node_event(U, "g1", "e1", "ne1", "COMPLETED", output_data={"out": ["ü"]})
        yield publish.publish_event(server.bus, server.layout, event)
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [push_frame("node_execution_event", exec_key(U, "e1"), publish.envelope(event)[11:-1])])

    # -- drops ----------------------------------------------------------------------

    @inlineCallbacks
    def test_dropped_and_counted(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        channel = self.exec_channel(server, U, "g1", "e1")
        cases = [
            ("oversized", envelope(b'{"event_type":"error_comms_update","error":"Payload too large",'
                                   b'"original_size_bytes":20000000,"max_size_bytes":16777216}')),
            ("unknown_type", envelope(b'{"event_type":"something_new","id":"e1","user_id":"%s"}' % U.encode())),
            ("unknown_type", envelope(b'{"id":"e1","user_id":"%s","graph_id":"g1"}' % U.encode())),
            ("malformed", b"not json"),
            ("malformed", b'{"payload":[1,2]}'),
            ("malformed", b'{"payload":"x"}'),
            ("malformed", b'{"nopayload":{}}'),
            ("malformed", b'{"payload":{"event_type":"node_execution_update","x":NaN}}'),
            ("malformed", b'{"payload":{"event_type":"node_execution_update","x":"\xff"}}'),
            ("malformed", b'{"payload":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ]
        for reason, data in cases:
            before = server.stats.events_dropped[reason]
            yield server.bus.publish(channel, data)
            self.assertEqual(server.stats.events_dropped[reason], before + 1, (reason, data[:60]))
        yield server.bus.publish("execution_event/only-two", envelope(graph_event_bytes(U, "g1", "e1")))
        self.assertEqual(server.stats.events_dropped["bad_channel"], 1)
        # a notification that is not one
        yield server.bus.publish(server.layout.notification(U), b'{"payload":{"user_id":"%s"}}' % U.encode())
        self.assertEqual(server.stats.events_dropped["malformed"], 8)
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [])
        self.assertEqual(server.stats.events_forwarded, 0)

    @inlineCallbacks
    def test_max_message_size_limit_applied(self) -> Any:
        """An envelope up to max_message_size_limit is delivered; one byte
        more is dropped, counted, never decoded."""
        server = self.server(max_message_size_limit=2048)
        client = yield self.client(server, ("exec", "e1"))
        channel = self.exec_channel(server, U, "g1", "e1")
        at_limit = publish.envelope(padded(publish.node_event(U, "g1", "e1", "ne1", "RUNNING"), 2048))
        over = publish.envelope(padded(publish.node_event(U, "g1", "e1", "ne2", "RUNNING"), 2049))
        yield server.bus.publish(channel, over)
        yield server.bus.publish(channel, at_limit)
        note = publish.envelope(padded(publish.notification(U, "agent_run", "done"), 2049))
        yield server.bus.publish(server.layout.notification(U), note)
        (got,) = yield self.pushed(client)
        self.assertEqual([json.loads(m)["data"]["node_exec_id"] for m in got], ["ne1"])
        self.assertEqual(server.stats.events_dropped["oversized"], 2)

    @inlineCallbacks
    def test_default_limit_16_mib(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"))
        event = padded(publish.node_event(U, "g1", "e1", "ne1", "RUNNING"), 16 * 1024 * 1024 + 1)
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), publish.envelope(event, max_size=32 << 20))
        (got,) = yield self.pushed(client)
        self.assertEqual(got, [])
        self.assertEqual(server.stats.events_dropped["oversized"], 1)

    @inlineCallbacks
    def test_nobody_subscribed_is_ignored_not_dropped(self) -> Any:
        server = self.server()
        yield self.client(server, ("exec", "e1"))
        yield server.bus.publish(self.exec_channel(server, U, "g1", "other"), b"not json, never decoded")
        self.assertEqual(server.stats.events_ignored, 1)
        self.assertEqual(sum(server.stats.events_dropped.values()), 0)

    # -- cleanup ----------------------------------------------------------------------

    def assertHubEmpty(self, server: WebsocketServer) -> None:
        self.assertEqual(server.hub.stats(), {"keys": 0, "users": 0, "subscriptions": 0})
        self.assertEqual(list(server.hub.keys()), [])
        self.assertEqual(list(server.hub.users()), [])

    @inlineCallbacks
    def test_cleanup_after_client_abort(self) -> Any:
        server = self.server()
        client = yield self.client(server, ("exec", "e1"), ("exec", "e2"), ("graph", "g1"))
        other = yield self.client(server, ("exec", "e1"))
        self.assertEqual(server.hub.stats(), {"keys": 3, "users": 1, "subscriptions": 4})
        client.transport.abortConnection()
        yield client.closed
        yield wait_for(lambda: len(server.factory.sockets) == 1)
        self.assertEqual(server.hub.stats(), {"keys": 1, "users": 1, "subscriptions": 1})
        other.transport.abortConnection()
        yield other.closed
        yield wait_for(lambda: not server.factory.sockets)
        self.assertHubEmpty(server)
        self.assertEqual(server.stats.open_sockets, 0)
        # events for the forgotten keys go nowhere, without error
        yield server.bus.publish(self.exec_channel(server, U, "g1", "e1"), envelope(graph_event_bytes(U, "g1", "e1")))
        self.assertEqual(server.stats.events_ignored, 1)

    @inlineCallbacks
    def test_cleanup_after_clean_close_and_server_close(self) -> Any:
        server = self.server()
        clean = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        binary = yield self.client(server, ("exec", "e2"))
        oversized = yield self.client(server, ("exec", "e3"))
        yield clean.disconnect()
        binary.sendMessage(b"\x00", isBinary=True)  # the server closes it, 1003
        oversized.send(b"x" * (server.settings.max_inbound_frame + 1))  # 1009
        codes = []
        for client in (binary, oversized):
            code, _ = yield client.closed
            codes.append(code)
        self.assertEqual(codes, [1003, 1009])
        yield wait_for(lambda: not server.factory.sockets)
        self.assertHubEmpty(server)

    # -- order ----------------------------------------------------------------------

    @inlineCallbacks
    def test_order_of_1000_events_on_one_channel(self) -> Any:
        server = self.server()
        first = yield self.client(server, ("exec", "e1"))
        second = yield self.client(server, ("exec", "e1"), ("graph", "g1"))
        channel = self.exec_channel(server, U, "g1", "e1")
        events = []
        for seq in range(1000):
            if seq % 100 == 99:
                event = graph_event_bytes(U, "g1", "e1", "RUNNING", seq=seq)
            else:
                event = node_event_bytes(U, "g1", "e1", f"ne{seq}", seq=seq)
            events.append(event)
            yield server.bus.publish(channel, envelope(event))
        got_first, got_second = yield self.pushed(first, second)
        self.assertEqual(len(got_first), 1000)
        self.assertEqual([json.loads(f)["data"]["seq"] for f in got_first], list(range(1000)))
        self.assertEqual(got_first, [
            push_frame("graph_execution_event" if seq % 100 == 99 else "node_execution_event",
                       exec_key(U, "e1"), event) for seq, event in enumerate(events)])
        on_exec = [f for f in got_second if json.loads(f)["channel"] == exec_key(U, "e1")]
        on_graph = [f for f in got_second if json.loads(f)["channel"] == graph_key(U, "g1")]
        self.assertEqual(on_exec, got_first)
        self.assertEqual([json.loads(f)["data"]["seq"] for f in on_graph], list(range(99, 1000, 100)))
