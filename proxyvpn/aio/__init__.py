"""The asyncio shell: TUN reader/writer, flows, one transmit(), timers."""
