"""The EROFS on-disk format: structures (`format`), the writer, the reader and the inode tree.

Importing it loads no compressor and nothing of the layer ingestion (`snapshotter.ingest`).
"""
