"""Layer ingestion: tar stream, decompression, tar/directory/native import, conversion."""
