"""The 3-layer image the publisher/node tests publish and pull (tests/vm/test_publish_node.py,
tests/vm/test_publish_erofs_pull.py): layer 2 whites out a file, layer 3 replaces the motd."""

from __future__ import annotations

MOTD = b"published, never signed on the node\n"
PAYLOAD = bytes(range(256)) * 64
LAYERS = [
    [
        ("dir", "etc", 0o755),
        ("file", "etc/motd", b"layer one\n", 0o644),
        ("dir", "data", 0o755),
        ("file", "data/gone", b"removed by layer 2\n", 0o644),
    ],
    [
        ("dir", "data", 0o755),
        ("whiteout", "data/gone"),
        ("file", "data/payload.bin", PAYLOAD, 0o644),
    ],
    [
        ("dir", "etc", 0o755),
        ("file", "etc/motd", MOTD, 0o644),
        ("symlink", "data/link", "payload.bin"),
    ],
]
