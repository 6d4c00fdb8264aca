"""Which Redis Cluster node owns a channel.

A channel (or key) lives in one of 16384 hash slots: CRC16-XMODEM of the
hash tag (the text between the first ``{`` and the next ``}``, when that is
not empty) or else of the whole name, modulo 16384.  AutoGPT's sharded
channels carry the tag ``{<user_id>/<graph_id>}``, so a graph's ``all``
channel and all its executions' channels share a slot and a node.

:class:`SlotMap` is the cluster's answer to ``CLUSTER SLOTS``: the master
address of every slot.  It is a value (built whole, then replaced), so a
refresh never leaves a half-updated map behind.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..config import Settings, redis_seed

SLOTS = 16384


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _table()


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (poly 0x1021, init 0), as Redis Cluster uses."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that is hashed (Redis's keyHashSlot rule)."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: str | bytes) -> int:
    """The hash slot of a key or shard channel, as ``CLUSTER KEYSLOT`` says."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return crc16(hash_tag(raw)) % SLOTS


Address = tuple[str, int]


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


Remap = Callable[[Address], Address]


def address_remap(seed_host: str, use_announced: bool) -> Remap:
    """Where to reach a node the cluster announces, as the AutoGPT server
    decides it (``REDIS_USE_ANNOUNCED_ADDRESS``): the announced address (or
    host name) itself, or the seed's host with the announced port (the
    default: nodes often announce addresses only the cluster's own network
    can reach)."""
    if use_announced:
        return lambda address: address
    return lambda address: (seed_host, address[1])


class SlotMap:
    """Owner (master address) of each slot; None where no node serves it."""

    __slots__ = ("_owners",)

    def __init__(self, owners: list[Address | None] | None = None) -> None:
        self._owners: list[Address | None] = owners if owners is not None else [None] * SLOTS

    @classmethod
    def from_cluster_slots(cls, reply: Iterable[Any], asked: Address) -> "SlotMap":
        """Build from a RESP2 ``CLUSTER SLOTS`` reply got from node ``asked``.

        Each entry is ``[start, end, [host, port, id, ...], replicas...]``.
        An empty host means "the address you asked"; ``?`` means unknown
        (that range stays unserved until a later refresh)."""
        owners: list[Address | None] = [None] * SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host == "?":
                continue
            address = (host or asked[0], int(master[1]))
            owners[start:end + 1] = [address] * (end - start + 1)
        return cls(owners)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotMap) and self._owners == other._owners

    __hash__ = None  # type: ignore[assignment]

    def owner(self, slot: int) -> Address | None:
        return self._owners[slot]

    def owner_of(self, channel: str) -> Address | None:
        return self._owners[key_slot(channel)]

    def masters(self) -> set[Address]:
        return {a for a in set(self._owners) if a is not None}

    def covered(self) -> bool:
        return None not in self._owners

    def remapped(self, remap: Remap) -> "SlotMap":
        """The same map with every owner's address passed through ``remap``."""
        new = {a: remap(a) for a in set(self._owners) if a is not None}
        return SlotMap([None if a is None else new[a] for a in self._owners])

    def with_owner(self, slot: int, address: Address) -> "SlotMap":
        """A copy where ``slot`` belongs to ``address`` (what a MOVED says)."""
        owners = list(self._owners)
        owners[slot] = address
        return SlotMap(owners)


def seed_nodes(settings: Settings) -> list[Address]:
    """The seed (REDIS_CLUSTER_HOST/PORT, else REDIS_HOST/PORT), then any
    more nodes listed in redis_cluster_nodes."""
    seeds = [redis_seed(settings), *(parse_address(node) for node in settings.redis_cluster_nodes)]
    return list(dict.fromkeys(seeds))


def remap_for(settings: Settings) -> Remap:
    """REDIS_USE_ANNOUNCED_ADDRESS, with the seed's host as the one to use
    when it is false."""
    return address_remap(redis_seed(settings)[0], settings.redis_use_announced_address)
