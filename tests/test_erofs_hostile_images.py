"""Untrusted EROFS images (a registry's native layer, a merge input) with damaged metadata:
every damage ends in a clear EpError or in a readable image, never a traceback or a hang."""

from __future__ import annotations

import io
import os
import signal
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.erofs import ErofsImage, convert_layer
from snapshotter.erofs.convert import import_erofs_image
from snapshotter.erofs.merge import merge_layers
from snapshotter.errors import EpError
from tests.layers import Entry, write_tar
from tests.test_erofs_convert import awkward_entries


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    out = tmp / "good.erofs"
    convert_layer(write_tar(tmp / "l.tar", awkward_entries()), out)
    return out


def _metadata_start(path: Path) -> int:
    from snapshotter.erofs import ErofsImage

    with ErofsImage(path) as img:
        return img.sb.meta_blkaddr * img.block_size


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


@settings(max_examples=int(os.environ.get("EROFS_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_metadata_is_an_error_or_harmless(good_image: Path, tmp_path: Path,
                                                  data: st.DataObject) -> None:
    start = _metadata_start(good_image)
    image = bytearray(good_image.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.one_of(st.integers(1024, 1152), st.integers(start, len(image) - 1)))
        image[where] = data.draw(st.integers(0, 255))
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        import_erofs_image(io.BytesIO(bytes(image)), tmp_path / "out.erofs")
        merge_layers([tmp_path / "out.erofs"], tmp_path / "m.fsmeta")
        with ErofsImage(tmp_path / "out.erofs") as img:
            for _path, info in img.walk():
                if stat.S_ISREG(info.mode) and info.size < 16 << 20:
                    img.read(info)
                elif stat.S_ISLNK(info.mode):
                    img.readlink(info)
                img.xattrs(info)
    except EpError:
        pass
    except _Timeout:
        pytest.fail("a damaged image made the reader hang")
    finally:
        signal.alarm(0)


def _cyclic_image(tmp_path: Path) -> bytes:
    """A real image whose `sub/x` entry is rewritten to point back at the root directory."""
    out = tmp_path / "cycle.erofs"
    convert_layer(write_tar(tmp_path / "l.tar", [Entry("./", "dir"), Entry("sub", "dir"),
                                                 Entry("sub/x", data=b"x")]), out)
    with ErofsImage(out) as img:
        root, listing = img.root_nid, img.read(img.lookup("sub"))
    image = bytearray(out.read_bytes())
    pos = image.find(listing)
    for i in range(0, 36, 12):  # the three dirents: '.', '..', 'x'
        if image[pos + i + 10] == 1:  # the regular file's (file type 1)
            image[pos + i:pos + i + 8] = root.to_bytes(8, "little")
            image[pos + i + 10] = 2
    return bytes(image)


def test_directory_cycle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EpError, match="cycle"):
        import_erofs_image(io.BytesIO(_cyclic_image(tmp_path)), tmp_path / "copy.erofs")


def test_merge_refuses_a_directory_cycle(tmp_path: Path) -> None:
    layer = tmp_path / "layer.erofs"
    layer.write_bytes(_cyclic_image(tmp_path))
    with pytest.raises(EpError, match="cycle"):
        merge_layers([layer], tmp_path / "m.fsmeta")
