"""The guest program: the agent that is PID 1 of the test guest's root (`python3 -m
passthrough.guest`), one module per job: server (port loop, dispatch), state (what the agent
set up), disks, dm (device-mapper), mounts, images (open_image), files, lockdown; verify (what
the guest checks before it opens an image). payload.py lists the files the guest image needs.
Runs under Debian bookworm's python3 with pyudev and python3-cryptography."""
