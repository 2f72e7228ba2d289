"""The conversion rules' version: what a signed root manifest says its roots were computed by.

A layer's EROFS bytes and dm-verity root depend only on the layer's content (its diffID: the
tar after decompression, whatever the compression) and on these rules; docs/erofs.md
("Reproducibility") lists exactly what the output depends on. Any change to the writer, the
tar import, the merge or the verity defaults that changes a byte of output for the same input
must bump this string, so a node can tell a publisher's manifest made by other rules from a
real mismatch.

The salt rule (one for every way a layer arrives): a layer's tree is salted with
`derive_layer_salt(the image's superblock UUID)`, a function of the EROFS bytes alone. A tar
layer's image gets UUIDv5 of its diffID (`convert.layer_uuid`), known before a byte is
written, so the tree is still hashed in the one pass that writes the image; a native EROFS
layer's UUID is read from its superblock. So a tar and the EROFS image it converts to, pushed
as a native layer, get the same salt and the same root. A native image whose UUID is all zero
is salted from its blob digest (`derive_salt`), as any blob. The fsmeta's salt derives from
the fsmeta's own digest (its bytes: the layers' images and tags), also content only.

History: `erofs-passthrough/1` salted a layer with `derive_salt(diffID)`, so the two ways a
layer arrives had two roots; `/2` has one.
"""

from __future__ import annotations

CONVERSION_RULES = "erofs-passthrough/2"
