"""tools/gpu_checks/pack_triton_cache.py: the packed cache holds what a cache hit loads (each
kernel's group file naming its metadata and binary, the launchers) and nothing cut off."""
import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from pack_triton_cache import pack, package_kernels  # noqa: E402

IR = ('source', 'ttir', 'ttgir', 'llir', 'ptx')


def _kernel(cache: Path, key: str, name: str, written_at: str) -> None:
    entry = cache / key
    entry.mkdir()
    paths = {}
    for suffix in IR + ('cubin', 'json'):
        (entry / f'{name}.{suffix}').write_bytes(f'{key} {suffix}'.encode())
        paths[f'{name}.{suffix}'] = f'{written_at}/{key}/{name}.{suffix}'
    (entry / f'__grp__{name}.json').write_text(json.dumps({'child_paths': paths}))


def test_pack_keeps_metadata_binaries_and_launchers(tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    _kernel(cache, 'A', '_k', '/tmp/triton-cache')
    (cache / 'L').mkdir()
    (cache / 'L' / '__triton_launcher.so').write_bytes(b'launcher')
    (cache / 'CUT').mkdir()  # a compilation cut off: IR only, no group file
    (cache / 'CUT' / '_k.ttir').write_text('partial')
    kernels, count = pack(cache, str(tmp_path / 'piece-'))
    data = b''.join(p.read_bytes() for p in sorted(tmp_path.glob('piece-*')))
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        names = sorted(tar.getnames())
        group = json.loads(tar.extractfile('A/__grp___k.json').read())
        cubin = tar.extractfile('A/_k.cubin').read()
    assert (kernels, count) == (1, 1)
    assert names == ['A/__grp___k.json', 'A/_k.cubin', 'A/_k.json', 'L/__triton_launcher.so']
    assert group == {'child_paths': {'_k.cubin': '/tmp/triton-cache/A/_k.cubin',
                                     '_k.json': '/tmp/triton-cache/A/_k.json'}}
    assert cubin == b'A cubin'


def test_pack_splits_into_pieces(tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    for i in range(3):
        _kernel(cache, f'K{i}', '_k', '/tmp/triton-cache')
    _, count = pack(cache, str(tmp_path / 'piece-'), piece_bytes=100)
    pieces = sorted(tmp_path.glob('piece-*'))
    assert count == len(pieces) > 1
    assert all(p.stat().st_size == 100 for p in pieces[:-1])
    with tarfile.open(fileobj=io.BytesIO(b''.join(p.read_bytes() for p in pieces)), mode='r:gz') as tar:
        assert len(tar.getnames()) == 9


def test_pack_keeps_only_the_kernels_keep_accepts(tmp_path):
    """By default the tool packs the kernels mmseg_segman/ops defines: not inductor's, not a
    probe's (read from the package's source)."""
    cache = tmp_path / 'cache'
    cache.mkdir()
    for key, name in (('A', '_na_fwd_kernel'), ('B', 'triton_poi_fused_add_0'), ('C', '_na_fwd_v1')):
        _kernel(cache, key, name, '/tmp/triton-cache')
    kernels, _ = pack(cache, str(tmp_path / 'piece-'), keep=package_kernels().__contains__)
    data = b''.join(p.read_bytes() for p in sorted(tmp_path.glob('piece-*')))
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        assert {name.split('/')[0] for name in tar.getnames()} == {'A'}
    assert kernels == 1
    assert {'_dense_conv_kernel', '_pw_fwd_kernel', '_rope_kernel'} <= package_kernels()


def test_pack_read_since_keeps_only_the_kernels_read_since(tmp_path):
    """``--read-since``: a kernel whose group file was last read before then (an older
    version of a changed kernel, unpacked from the last pack) is left out."""
    import os
    cache = tmp_path / 'cache'
    cache.mkdir()
    for key in ('OLD', 'USED'):
        _kernel(cache, key, '_k', '/tmp/triton-cache')
    group = cache / 'OLD' / '__grp___k.json'
    os.utime(group, (1, group.stat().st_mtime))
    kernels, _ = pack(cache, str(tmp_path / 'piece-'), read_since=1000)
    data = b''.join(p.read_bytes() for p in sorted(tmp_path.glob('piece-*')))
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        assert {name.split('/')[0] for name in tar.getnames()} == {'USED'}
    assert kernels == 1
