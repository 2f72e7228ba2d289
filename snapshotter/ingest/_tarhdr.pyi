# Type stub of the optional compiled tar header parser (_tarhdr.c).
def parse(
    block: bytes, /
) -> tuple[bytes, int, int, int, int, int, int, bytes, int, int, bytes] | None: ...
