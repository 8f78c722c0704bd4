"""Client addresses behind reverse proxies: who is trusted, and who the client really is.

`X-Forwarded-For` is a de-facto header (RFC 7239 standardises the `Forwarded` equivalent): each
proxy appends the address of the peer it received the request from. Anything left of the entries
written by proxies we trust was written by the client and proves nothing, so the walk runs from
the right and stops at the first address that is not one of ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Bound on each per-instance cache; the addresses in flight at once are few.
DEFAULT_CACHE_SIZE = 1024
# "[" IPv6 with zone "]:" port, with room for whitespace: anything longer is not an address.
_MAX_HOP_BYTES = 96

_K = TypeVar("_K")
_V = TypeVar("_V")


def parse_network(spec: str) -> IPNetwork:
    """`spec` ("10.0.0.0/8", "2001:db8::/32" or a bare address) as a network.

    Raises ValueError naming `spec` when it is not one. Host bits set under the mask
    ("10.0.0.1/8") are an error rather than silently widened: a typo in a trust list
    must not trust more than was meant.
    """
    try:
        return ipaddress.ip_network(spec.strip(), strict=True)
    except ValueError as exc:
        hint = ""
        try:
            wide = ipaddress.ip_network(spec.strip(), strict=False)
        except ValueError:
            pass
        else:
            hint = f"; it has host bits set, did you mean {wide}?"
        raise ValueError(f"{spec!r} is not an IP address or CIDR network{hint}") from exc


def _canonical(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address ("::ffff:10.0.0.1") as the IPv4 address it carries.

    Dual-stack sockets report IPv4 peers in mapped form; one client must have one key.
    """
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_hop(entry: bytes) -> str | None:
    """One `X-Forwarded-For` entry as a canonical address string, or None if malformed.

    Accepts a bare address with optional surrounding whitespace, and the "ip:port" /
    "[ipv6]:port" forms some load balancers emit (the port is dropped). Anything else
    ("unknown", obfuscated RFC 7239 identifiers, host names, empty) is malformed.
    """
    try:
        text = entry.strip(b" \t").decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        text, closed, rest = text[1:].partition("]")
        if not closed or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:  # IPv4 with a port; IPv6 has at least two colons
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        return str(_canonical(ipaddress.ip_address(text)))
    except ValueError:
        return None


class TrustedProxies:
    """The set of proxies whose `X-Forwarded-For` entries we believe.

    This runs on every request and parsing an address costs microseconds, so trust decisions
    (per peer string) and parsed hops (per raw entry) are cached in FIFO-bounded dicts. An
    attacker spraying distinct values only churns the caches. Not thread-safe: one instance per
    event loop, as every stage.
    """

    def __init__(self, networks: Iterable[str], cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """Raises ValueError naming the first entry of `networks` that is not a CIDR or address."""
        self._networks: tuple[IPNetwork, ...] = tuple(parse_network(n) for n in networks)
        self._cache_size = max(1, cache_size)
        self._trust: dict[str, bool] = {}
        self._hops: dict[bytes, tuple[str, bool] | None] = {}

    def is_trusted(self, ip: str) -> bool:
        """Whether the bare address `ip` lies in a trusted network; False for anything unparsable."""
        if not self._networks:
            return False
        trusted = self._trust.get(ip)
        if trusted is None:
            try:
                addr = _canonical(ipaddress.ip_address(ip))
            except ValueError:
                trusted = False
            else:
                trusted = any(addr in net for net in self._networks)
            self._remember(self._trust, ip, trusted)
        return trusted

    def client_ip(self, peer: str, xff_values: list[bytes]) -> str:
        """The address of the client, given the direct `peer` and every `X-Forwarded-For` line.

        - An untrusted `peer` is the client: its `X-Forwarded-For` is ignored entirely.
        - Otherwise the lines are combined in order (RFC 9110 §5.3: field lines combine as a
          comma-separated list) and walked from the right, skipping trusted proxies; the first
          untrusted address is the client.
        - A malformed entry stops the walk: whoever wrote it cannot be vouched for, so the answer
          is the last hop we could verify (the trusted proxy that handed us that entry, or `peer`).
          Nothing left of a malformed entry is ever used: that part is client-supplied.
        - If every entry is trusted, the leftmost one is the client (traffic from a proxy itself).

        Addresses taken from the header are canonical (`ipaddress` form, IPv4-mapped IPv6
        unwrapped); `peer` is returned as given.
        """
        if not self.is_trusted(peer):
            return peer
        last = peer
        entries = b",".join(xff_values).split(b",") if xff_values else []
        for entry in reversed(entries):
            hop = self._hop(entry)
            if hop is None:
                return last
            address, trusted = hop
            if not trusted:
                return address
            last = address
        return last

    def _hop(self, entry: bytes) -> tuple[str, bool] | None:
        """`entry` parsed (`parse_hop`) with its trust, or None if malformed; cached."""
        if len(entry) > _MAX_HOP_BYTES:
            return None  # never a valid hop; and not worth a cache slot
        try:
            return self._hops[entry]
        except KeyError:
            pass
        address = parse_hop(entry)
        hop = None if address is None else (address, self.is_trusted(address))
        self._remember(self._hops, entry, hop)
        return hop

    def _remember(self, cache: dict[_K, _V], key: _K, value: _V) -> None:
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # evict the oldest; dicts keep insertion order
        cache[key] = value


def client_scheme(scope_scheme: str, peer: str, forwarded_proto: bytes | None,
                  trusted: TrustedProxies | None) -> str:
    """The scheme the client used: ours, or ``X-Forwarded-Proto`` from a trusted proxy
    (a TLS-terminating proxy in front of a plain-HTTP gateway); never a client's claim."""
    if trusted is not None and forwarded_proto in (b"http", b"https") and trusted.is_trusted(peer):
        return forwarded_proto.decode()
    return scope_scheme
