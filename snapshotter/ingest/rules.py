"""The conversion rules' version: what a signed root manifest says its roots were computed by.

A layer's EROFS bytes and dm-verity root depend only on the layer's content (its diffID: the
tar after decompression, whatever the compression) and on these rules; docs/erofs.md
("Reproducibility") lists exactly what the output depends on. Any change to the writer, the
tar import, the merge or the verity defaults that changes a byte of output for the same input
must bump this string, so a node can tell a publisher's manifest made by other rules from a
real mismatch.

The salt rule (one for every way a layer arrives): a layer's tree is salted with
`derive_salt(diffID)`. A tar layer's diffID is the sha256 of the uncompressed tar; a native
EROFS layer (`application/vnd.erofs.layer.v1`) is uncompressed, so the blob *is* the layer and
its digest is its diffID. The fsmeta's salt derives from the fsmeta's own digest.
"""

from __future__ import annotations

CONVERSION_RULES = "erofs-passthrough/1"
