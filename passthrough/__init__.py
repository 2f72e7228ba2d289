"""Attaching verified devices to QEMU guests over QMP."""
