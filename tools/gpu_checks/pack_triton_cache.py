"""Pack Triton's on-disk cache to be carried to the next GPU machine: only what a cache hit
loads (each kernel's metadata and binary), the intermediate IR left out.

    python3 tools/gpu_checks/pack_triton_cache.py /tmp/triton-cache $OUT/triton-cache.tgz.part-

A cache hit reads a kernel's group file (``__grp__<name>.json``), which names the files of the
kernel, and loads the metadata (``.json``) and the binary (``.cubin``); the IR of each stage
(``.source``, ``.ttir``, ``.ttgir``, ``.llir``, ``.ptx``) is kept for inspection only and
makes up about 70% of the compressed cache (SegMAN's kernels: 59 MB compressed, 17 MB without
the IR, twenty-second session). Here each group file is rewritten to name the metadata and
binary alone, and the cache is written as a gzipped tar in pieces of at most 15 MiB
(``<prefix>00``, ``<prefix>01``, ...; a file coming back from the machine is at most 16 MiB),
to be unpacked where the cache was (the group files hold absolute paths):
``cat <prefix>* | tar -xzf - -C /tmp/triton-cache``.

Only the kernels that ``mmseg_segman/ops`` defines are packed (``--all``: every kernel): the
kernels that inductor generates for a compiled model, and those of probes run beside the
package, took 11% of the cache and pushed what a call carries towards its 64 MiB
(twenty-fourth session). The unpacked cache also keeps every older version of a kernel that
was changed since, so the pack grew by each session's work; ``--read-since EPOCH`` packs only
the kernels whose group file was read or written since then (its access time), the kernels a
call used: ``setup_device.sh`` dates every unpacked file's access time back to 1970, and a
file read later gets the time of its reading (Linux's default ``relatime`` mount updates an
access time older than the file's modification).
"""
import argparse
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Callable, Optional, Set, Tuple

KEPT_SUFFIXES = ('.json', '.cubin')
PIECE_BYTES = 15 << 20
OPS = Path(__file__).resolve().parents[2] / 'mmseg_segman' / 'ops'


def package_kernels(ops: Path = OPS) -> Set[str]:
    """The names of the Triton kernels defined in ``ops`` (a function right after a decorator
    that names ``jit``), read from the source: no import of the package needed."""
    pattern = re.compile(r'^@[\w.]*jit\w*(?:\(.*\))?\s*\ndef (\w+)\(', re.MULTILINE)
    return {name for source in sorted(ops.glob('*.py')) for name in pattern.findall(source.read_text())}


class Pieces(io.RawIOBase):
    """A binary stream written as files ``prefix00``, ``prefix01``, ... of ``size`` bytes."""

    def __init__(self, prefix: str, size: int = PIECE_BYTES):
        self.prefix, self.size, self.count, self.file, self.left = prefix, size, 0, None, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self.left == 0:
                self._next()
            n = min(self.left, len(view))
            self.file.write(view[:n])
            self.left -= n
            view = view[n:]
        return len(data)

    def _next(self) -> None:
        if self.file:
            self.file.close()
        self.file = open(f'{self.prefix}{self.count:02d}', 'wb')
        self.count += 1
        self.left = self.size

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        super().close()


def kernel_files(entry: Path, keep: Optional[Callable[[str], bool]] = None,
                 read_since: Optional[float] = None) -> dict:
    """``{name in the archive: bytes}`` of one cache entry (a directory): a kernel's group
    files rewritten to name only the kept files, and the kept files themselves; a compiled
    launcher or Triton's CUDA utilities (``.so``) as they are. A kernel whose compilation was
    cut off (no group file, or one naming a missing file), whose name ``keep`` refuses, or whose
    group file was last read before ``read_since`` (seconds since the epoch), is left out."""
    files = {f'{entry.name}/{so.name}': so.read_bytes() for so in entry.glob('*.so')}
    for group in entry.glob('__grp__*.json'):
        if keep is not None and not keep(group.name[len('__grp__'):-len('.json')]):
            continue
        if read_since is not None and group.stat().st_atime < read_since:
            continue
        paths = json.loads(group.read_text()).get('child_paths') or {}
        kept = {name: path for name, path in paths.items() if name.endswith(KEPT_SUFFIXES)}
        # read from the entry itself: the paths are where the cache was written
        local = [entry / Path(path).name for path in kept.values()]
        if not any(name.endswith('.cubin') for name in kept) or not all(f.is_file() for f in local):
            continue
        files[f'{entry.name}/{group.name}'] = json.dumps({'child_paths': kept}).encode()
        for path in local:
            files[f'{entry.name}/{path.name}'] = path.read_bytes()
    return files


def pack(cache: Path, prefix: str, piece_bytes: int = PIECE_BYTES,
         keep: Optional[Callable[[str], bool]] = None,
         read_since: Optional[float] = None) -> Tuple[int, int]:
    """Write the kept files of every entry of ``cache`` (of the kernels ``keep`` accepts by
    name, all if None; read since ``read_since``, all if None: :func:`kernel_files`) as pieces
    of ``piece_bytes``; returns the number of kernels and of pieces."""
    kernels = 0
    with Pieces(prefix, piece_bytes) as pieces:
        with tarfile.open(fileobj=pieces, mode='w:gz') as tar:
            for entry in sorted(p for p in cache.iterdir() if p.is_dir()):
                files = kernel_files(entry, keep, read_since)
                kernels += any(name.endswith('.cubin') for name in files)
                for name, data in sorted(files.items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return kernels, pieces.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('cache', type=Path, help="Triton's cache directory (TRITON_CACHE_DIR)")
    parser.add_argument('prefix', help='the pieces are written as <prefix>00, <prefix>01, ...')
    parser.add_argument('--all', action='store_true',
                        help='every kernel, not only those mmseg_segman/ops defines')
    parser.add_argument('--read-since', type=float, metavar='EPOCH',
                        help='only the kernels whose group file was read or written since '
                             'then (seconds since the epoch, as date +%%s prints)')
    args = parser.parse_args()
    kernels, count = pack(args.cache, args.prefix,
                          keep=None if args.all else package_kernels().__contains__,
                          read_since=args.read_since)
    print(f'{kernels} kernels in {count} pieces {args.prefix}*')


if __name__ == '__main__':
    main()
