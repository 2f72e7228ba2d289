# Type stub of the optional compiled loop (_hashrun.c).
def hash_run(
    name: str,
    salt: bytes | bytearray | memoryview,
    data: bytes | bytearray | memoryview,
    block_size: int,
    /,
) -> bytes: ...
