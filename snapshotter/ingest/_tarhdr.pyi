# Type stub of the optional compiled tar header parser (_tarhdr.c).
def parse(
    block: bytes, /
) -> tuple[bytes, int, int, int, int, int, int, bytes, int, int, bytes] | None: ...
def parse_pax(data: bytes, /) -> dict[bytes, bytes] | None: ...
def member(
    view: memoryview | bytes, pos: int, max_header_bytes: int, /
) -> (
    tuple[bytes, int, int, int, int, int, int, int, bytes, int, int, dict[bytes, bytes], int] | None
): ...
