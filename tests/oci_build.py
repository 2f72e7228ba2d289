"""The OCI archive builder lives in shim_integration.oci_archive (the demo uses it too)."""

from shim_integration.oci_archive import Blob, build_image, chain_ids, layer_tar, write_archive

__all__ = ["Blob", "build_image", "chain_ids", "layer_tar", "write_archive"]
