"""Generated from snapshotter/service/proto by snapshotter.service.proto.generate."""
