"""The containerd service: store, layout, mounts, gRPC Snapshots and Diff, config, server."""
