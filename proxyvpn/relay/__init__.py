"""Relaying flows through an upstream HTTP CONNECT proxy.

Every TCP flow captured from the TUN device becomes one CONNECT tunnel
(RFC 9110 §9.3.6) to the upstream proxy. The package is split like the rest of
proxyvpn: a pure core and a thin I/O shell.

- :mod:`proxyvpn.relay.connect` -- sans-IO: builds the CONNECT request and parses
  the proxy's response incrementally, keeping any bytes that follow the header
  block (they already belong to the tunnelled flow).
- :mod:`proxyvpn.relay.dial` -- asyncio: connects to the proxy (trying its
  addresses in order, on a socket carrying the bypass ``SO_MARK``), optionally
  over TLS, performs the handshake and then relays bytes with back-pressure to
  a :class:`~proxyvpn.relay.dial.TunnelSink`.
- :mod:`proxyvpn.relay.miniproxy` -- a small built-in CONNECT proxy used by
  ``proxyvpn demo`` and by the tests (``python -m proxyvpn.relay.miniproxy``).
"""
