"""EROFS layers, dm-verity and the containerd-facing services."""
