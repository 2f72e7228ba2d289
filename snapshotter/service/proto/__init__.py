"""Our copies of containerd's API `.proto` files (same wire format) and their code generator."""
