"""The only code that touches the kernel: netlink, nftables, TUN, sysctls, state."""
