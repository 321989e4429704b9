"""proxyvpn: a rootless TUN-based system VPN that relays TCP through an HTTP CONNECT proxy.

CLI -> config -> plan -> system (apply); TUN -> netstack -> relay, driven by aio.
"""

from proxyvpn import _compiled

__version__ = "0.1.0"

_compiled.install_if_asked()
