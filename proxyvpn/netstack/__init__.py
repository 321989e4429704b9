"""Sans-IO network stack: wire format (parse/emit), sequence arithmetic, TCP states, flows."""
