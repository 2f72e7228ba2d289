"""dm-verity hash trees, byte-compatible with `veritysetup format` (hash format 1).

- `VerityParams`: hash, block sizes, salt, superblock, UUID.
- `VerityTreeBuilder`: streaming: hash blocks as they are written (any order), `finish` writes
  [superblock +] tree.
- `format_file` / `verify_file`: whole files, appended tree (containerd's layout) or a
  separate hash file.
- `VerityInfo`: the result, with the dm table line, Kata's `DmVerityInfo` and containerd's
  `.dmverity` sidecar; `KATA_VERITY`: the unsalted parameters of a tree meant for Kata.
- `derive_salt`: the default salt of a blob, from its sha256 digest.
- `tree_start_block`: where the tree starts on the hash device (`VerityInfo.hash_start_block`),
  the one statement of that rule.

See docs/verity.md.
"""

from snapshotter.verity.builder import VerityTreeBuilder
from snapshotter.verity.files import default_params, format_file
from snapshotter.verity.geometry import tree_start_block
from snapshotter.verity.info import DmVerityInfo, VerityInfo
from snapshotter.verity.params import KATA_VERITY, VerityParams, derive_salt, derive_uuid
from snapshotter.verity.superblock import VeritySuperblock
from snapshotter.verity.verify import read_superblock, verify_file

__all__ = [
    "KATA_VERITY",
    "DmVerityInfo",
    "VerityInfo",
    "VerityParams",
    "VeritySuperblock",
    "VerityTreeBuilder",
    "default_params",
    "derive_salt",
    "derive_uuid",
    "format_file",
    "read_superblock",
    "tree_start_block",
    "verify_file",
]
