"""The EROFS on-disk format: structures, writer, reader, tar import and layer conversion."""

from .convert import ConvertResult, convert_directory, convert_layer
from .reader import ErofsImage

__all__ = ["ConvertResult", "ErofsImage", "convert_directory", "convert_layer"]
