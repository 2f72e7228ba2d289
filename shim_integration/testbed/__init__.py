"""The demo and its test bed: a private containerd, OCI archives, a local registry."""
