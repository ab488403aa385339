"""Low-level probes the doctor uses: a krb5.conf reader and a raw Kerberos AS-REQ that reads the KDC's clock.

The probe asks the KDC for a ticket for a principal that does not exist (``kerb-jupyter-doctor-probe``): any
KDC answers with a KRB-ERROR that carries its own time (``stime``) and an error code, over UDP or TCP. That
proves the port answers with Kerberos (not just that something listens) and measures the clock skew,
without sending a key, a password or the user's name.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

PROBE_NAME = "kerb-jupyter-doctor-probe"
KRB_ERROR_NAMES = {6: "client unknown (expected for the probe)", 25: "pre-authentication required",
                   68: "wrong realm", 14: "encryption type not supported"}


@dataclass
class Krb5Conf:
    """The parts of a krb5.conf the doctor needs; relations are kept as lists of values."""

    path: Path
    libdefaults: dict[str, str] = field(default_factory=dict)
    realms: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    domain_realm: dict[str, str] = field(default_factory=dict)

    def flag(self, key: str, default: bool) -> bool:
        value = self.libdefaults.get(key)
        if value is None:
            return default
        return value.lower() in ("true", "yes", "1", "on")

    def realm_for_host(self, host: str) -> str | None:
        """MIT's [domain_realm] lookup: the exact host, then each parent domain with a leading dot."""
        host = host.lower().rstrip(".")
        if host in self.domain_realm:
            return self.domain_realm[host]
        parts = host.split(".")
        for i in range(len(parts)):
            key = "." + ".".join(parts[i:])
            if key in self.domain_realm:
                return self.domain_realm[key]
        return self.libdefaults.get("default_realm")


def krb5_conf_path() -> Path:
    """The krb5.conf libkrb5 reads: the first entry of ``KRB5_CONFIG``, else /etc/krb5.conf."""
    env = os.environ.get("KRB5_CONFIG", "")
    first = env.split(":")[0] if env else ""
    return Path(first) if first else Path("/etc/krb5.conf")


_SECTION = re.compile(r"^\[([A-Za-z_]+)\]$")
_RELATION = re.compile(r"^([^=\s]+)\s*=\s*(.*)$")


def parse_krb5_conf(path: Path) -> Krb5Conf:
    """Parse the profile syntax (sections, ``tag = value``, ``tag = { ... }``). Raises ValueError with a line."""
    conf = Krb5Conf(path)
    section = ""
    stack: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = _SECTION.match(line)
        if m and not stack:
            section = m.group(1).lower()
            continue
        if line == "}":
            if not stack:
                raise ValueError(f"line {number}: '}}' without an open '{{'")
            stack.pop()
            continue
        m = _RELATION.match(line)
        if not m or not section:
            raise ValueError(f"line {number}: expected 'name = value' inside a [section], got {line[:60]!r}")
        tag, value = m.group(1), m.group(2).strip()
        if value == "{":
            stack.append(tag)
            if section == "realms" and len(stack) == 1:
                conf.realms.setdefault(tag, {})
            continue
        if section == "libdefaults" and not stack:
            conf.libdefaults[tag] = value
        elif section == "realms" and len(stack) == 1:
            conf.realms[stack[0]].setdefault(tag, []).append(value)
        elif section == "domain_realm" and not stack:
            conf.domain_realm[tag.lower()] = value
    if stack:
        raise ValueError(f"'{stack[-1]} = {{' is never closed")
    return conf


def split_host_port(entry: str, default: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; a trailing ``:port`` from krb5.conf is honoured."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, default


# -- DER, just enough for an AS-REQ and a KRB-ERROR -------------------------------------------------
def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _ctx(n: int, body: bytes) -> bytes:
    return _tlv(0xA0 | n, body)


def _seq(*parts: bytes) -> bytes:
    return _tlv(0x30, b"".join(parts))


def _int(v: int) -> bytes:
    return _tlv(0x02, v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big", signed=True))


def _name(kind: int, *parts: str) -> bytes:
    return _seq(_ctx(0, _int(kind)), _ctx(1, _seq(*(_tlv(0x1B, p.encode()) for p in parts))))


def as_req(realm: str) -> bytes:
    body = _seq(
        _ctx(0, _tlv(0x03, b"\x00\x00\x00\x00\x00")),  # kdc-options: none
        _ctx(1, _name(1, PROBE_NAME)),
        _ctx(2, _tlv(0x1B, realm.encode())),
        _ctx(3, _name(2, "krbtgt", realm)),
        _ctx(5, _tlv(0x18, b"20370101000000Z")),
        _ctx(7, _int(secrets.randbits(31))),
        _ctx(8, _seq(_int(18), _int(17))),
    )
    return _tlv(0x6A, _seq(_ctx(1, _int(5)), _ctx(2, _int(10)), _ctx(4, body)))


def _read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:pos + length], pos + length


@dataclass(frozen=True)
class KdcAnswer:
    kind: str  # "error" | "reply"
    error_code: int | None
    kdc_time: float | None


def parse_answer(data: bytes) -> KdcAnswer:
    """A KRB-ERROR (its stime and error code) or an AS-REP. Raises ValueError for anything else."""
    tag, body, _ = _read(data, 0)
    if tag == 0x6B:
        return KdcAnswer("reply", None, None)
    if tag != 0x7E:
        raise ValueError(f"not a Kerberos message (tag {tag:#x})")
    _, seq, _ = _read(body, 0)
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(seq):
        t, inner, pos = _read(seq, pos)
        fields[t & 0x1F] = inner
    when = None
    if 4 in fields:
        _, stamp, _ = _read(fields[4], 0)
        parsed = datetime.strptime(stamp.decode(), "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
        micro = int.from_bytes(_read(fields[5], 0)[1], "big") if 5 in fields else 0
        when = parsed.timestamp() + micro / 1e6
    code = int.from_bytes(_read(fields[6], 0)[1], "big", signed=True) if 6 in fields else None
    return KdcAnswer("error", code, when)


def probe_kdc(host: str, port: int, realm: str, transport: str, timeout: float) -> KdcAnswer:
    """Send the probe AS-REQ over ``udp`` or ``tcp``. Raises OSError (refused, timeout) or ValueError."""
    request = as_req(realm)
    family, kind, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)[0]
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        sock.connect(addr)
        if transport == "udp":
            sock.send(request)
            return parse_answer(sock.recv(65535))
        sock.sendall(struct.pack(">I", len(request)) + request)
        header = _recv_exact(sock, 4)
        return parse_answer(_recv_exact(sock, struct.unpack(">I", header)[0] & 0x7FFFFFFF))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = b""
    while len(chunks) < n:
        part = sock.recv(n - len(chunks))
        if not part:
            raise ConnectionResetError("the KDC closed the connection")
        chunks += part
    return chunks


def tcp_open(host: str, port: int, timeout: float) -> None:
    """Raises OSError when nothing accepts a TCP connection on host:port within ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout):
        pass
