"""Which ``Host`` and ``Origin`` headers the jam server answers (its defence against other sites).

A page on another site can reach a server on this machine through the visitor's browser in two
ways: a cross-origin WebSocket (its ``Origin`` names the other site), and DNS rebinding (the other
site points its own name at 127.0.0.1, so the browser sends ``Host`` and ``Origin`` with that
name, and the page counts as same-origin). So the server answers only requests whose ``Host``
names an allowed host and port, and WebSocket handshakes whose ``Origin`` (browsers always send
one; other clients need not) is http or https on an allowed host and port.

Allowed: ``localhost``, ``127.0.0.1`` and ``[::1]`` on the server's port; the address the server
binds when that is one address (not 0.0.0.0 or ::); and each ``--allow-host`` entry: ``NAME``
(on the server's port), ``NAME:PORT``, or ``NAME:*`` (any port, e.g. behind a reverse proxy).
Names compare case-insensitively, IP addresses by value. A ``Host`` without a port means port 80
or 443 (the scheme is not known there); an ``Origin`` without one its scheme's default port.
"""
from __future__ import annotations

import ipaddress
import re

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_PORT = -1
WILDCARD_BINDS = ("", "0.0.0.0", "::")
# host name, IPv4 address or [IPv6 address], then an optional :port
_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::([0-9]{1,5}|\*))?")
_ORIGIN = re.compile(r"(https?)://(.*)")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _norm(name: str) -> str:
  name = name.lower()
  try:
    return str(ipaddress.ip_address(name))
  except ValueError:
    return name


def _show(name: str, port: int) -> str:
  host = f"[{name}]" if ":" in name else name
  return f"{host}:*" if port == ANY_PORT else f"{host}:{port}"


def split_authority(text: str, star: bool = False) -> tuple[str, int | None]:
  """``NAME``, ``NAME:PORT``, ``[V6]`` or ``[V6]:PORT`` -> (normalised name, port or None); with
  ``star``, ``:*`` gives ``ANY_PORT``. Anything else -> ValueError naming the problem."""
  m = _AUTHORITY.fullmatch(text)
  if m is None:
    raise ValueError(f"{text[:80]!r} is not a host name or address with an optional :port")
  v6, name, port = m.groups()
  if v6 is not None:
    try:
      ipaddress.IPv6Address(v6)
    except ValueError:
      raise ValueError(f"{text[:80]!r}: [{v6}] is not an IPv6 address") from None
  if port is None:
    return _norm(v6 or name), None
  if port == "*":
    if not star:
      raise ValueError(f"{text[:80]!r}: the port must be a number")
    return _norm(v6 or name), ANY_PORT
  if not 0 < int(port) < 65536:
    raise ValueError(f"{text[:80]!r}: port {int(port)} is not in 1..65535")
  return _norm(v6 or name), int(port)


def parse_allow_host(entry: str) -> tuple[str, int | None]:
  """An ``--allow-host`` entry -> (name, port, None for the server's port, or ANY_PORT). A bare
  IPv6 address (``fe80::1``) is read as that address; with a port it needs brackets."""
  if entry.count(":") > 1 and not entry.startswith("["):
    entry = f"[{entry}]"
  return split_authority(entry, star=True)


class HostPolicy:
  """The allowed (name, port) pairs of one listening server; see the module docstring."""

  def __init__(self, port: int, allow_hosts=(), bind_host: str | None = None):
    self.port = int(port)
    self.allowed: dict[str, set[int]] = {}
    for name in LOCAL_NAMES:
      self._add(name, self.port)
    if bind_host is not None and bind_host not in WILDCARD_BINDS:
      try:
        self._add(parse_allow_host(bind_host)[0], self.port)
      except ValueError:
        pass  # e.g. a scoped IPv6 address (fe80::1%eth0): no browser sends it as a Host
    for entry in allow_hosts:
      name, p = parse_allow_host(entry)
      self._add(name, self.port if p is None else p)

  def _add(self, name: str, port: int):
    self.allowed.setdefault(name, set()).add(port)

  def describe(self) -> str:
    return ", ".join(_show(n, p) for n, ports in self.allowed.items() for p in sorted(ports))

  def _allows(self, name: str, ports: set[int]) -> bool:
    allowed = self.allowed.get(name, set())
    return ANY_PORT in allowed or bool(allowed & ports)

  def host_problem(self, host: str) -> str | None:
    """Why a ``Host`` header value is refused, or None when it is allowed."""
    try:
      name, port = split_authority(host)
    except ValueError as e:
      return f"bad Host header: {e}"
    if not self._allows(name, {80, 443} if port is None else {port}):
      return (f"Host {host[:80]!r} is not one of this server's names ({self.describe()}); "
              "start the server with --allow-host NAME[:PORT] to add one")
    return None

  def origin_problem(self, origin: str) -> str | None:
    """Why an ``Origin`` header value is refused, or None when it is allowed."""
    m = _ORIGIN.fullmatch(origin)
    if m is None:
      return (f"Origin {origin[:80]!r} is not an http or https page of this server (start the "
              "server with --any-origin to allow other pages)")
    try:
      name, port = split_authority(m.group(2))
    except ValueError as e:
      return f"bad Origin header: {e}"
    if not self._allows(name, {DEFAULT_PORTS[m.group(1)] if port is None else port}):
      return (f"Origin {origin[:80]!r} is not a page of this server ({self.describe()}); start "
              "the server with --allow-host NAME[:PORT] or --any-origin to allow it")
    return None
