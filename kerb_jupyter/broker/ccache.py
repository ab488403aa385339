"""The FILE credential cache format (version 4) the broker hands out, as krb5_marshal_credentials encodes it."""

from __future__ import annotations

import struct

from ..core.errors import TicketError


def _counted(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def encode_principal(name: str, name_type: int = 1) -> bytes:
    user, _, realm = name.rpartition("@")
    parts = user.split("/")
    return struct.pack(">II", name_type, len(parts)) + _counted(realm.encode()) + b"".join(
        _counted(p.encode()) for p in parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TicketError("a credential from the KDC could not be decoded", code="bad_credential")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def counted(self) -> bytes:
        return self.take(self.u32())

    def principal(self) -> None:
        self.u32()
        count = self.u32()
        for _ in range(count + 1):
            self.counted()


def rewrite_creds(raw: bytes, spn: str) -> bytes:
    """A marshalled credential with the server principal set to ``spn`` (full realm) and no second ticket."""
    r = _Reader(raw)
    r.principal()
    client_end = r.pos
    r.principal()
    rest = r.pos
    r.take(2)
    r.counted()  # keyblock
    r.take(16)  # authtime, starttime, endtime, renew_till
    is_skey_at = r.pos
    r.take(1 + 4)  # is_skey, ticket flags
    for _ in range(2):  # addresses, authdata
        for _ in range(r.u32()):
            r.take(2)
            r.counted()
    r.counted()  # the service ticket
    ticket_end = r.pos
    r.counted()  # the evidence ticket: dropped
    return (raw[:client_end] + encode_principal(spn, name_type=2) + raw[rest:is_skey_at] + b"\x00"
            + raw[is_skey_at + 1:ticket_end] + _counted(b""))


def build_cache(principal: str, creds: list[bytes]) -> bytes:
    """A whole FILE cache (header, default principal ``principal``, then the marshalled ``creds``)."""
    return struct.pack(">HH", 0x0504, 0) + encode_principal(principal) + b"".join(creds)
