"""What a Kata-style runtime needs: volumes, attestation manifests, the guest agent, the CLI."""
