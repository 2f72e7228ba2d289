"""Worker process for `parallel`: hash a range of a file's blocks, stream the digests.

`python -m snapshotter.verity.worker PATH FIRST COUNT BLOCK_SIZE HASH SALT_HEX|-`; writes
frames `<first_block u64 LE><length u32 LE><digests>` to stdout, exits 1 with a message on
stderr on failure.
"""

from __future__ import annotations

import sys

from snapshotter.errors import EpError
from snapshotter.verity.parallel import FRAME, hash_file_range


def main(argv: list[str]) -> int:
    path, first, count, block_size, hash_name, salt_hex = argv
    salt = b"" if salt_hex == "-" else bytes.fromhex(salt_hex)
    out = sys.stdout.buffer
    try:
        for b0, digests in hash_file_range(
            path, int(first), int(count), int(block_size), hash_name, salt
        ):
            out.write(FRAME.pack(b0, len(digests)))
            out.write(digests)
        out.flush()
    except (EpError, OSError) as exc:
        print(f"verity worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
