"""Generated from snapshotter/proto by snapshotter.proto.generate."""
