"""The guest agent: what runs inside the VM, verifying and mounting what the host attached."""
