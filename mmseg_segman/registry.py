"""Registries of the ``mmseg_segman`` scope: children of mmseg's, so everything mmseg
registers (and SegMAN, registered into mmseg's ``MODELS``) builds from it.

mmengine tags what a config inherits through ``mmseg_segman::`` with
``_scope_='mmseg_segman'`` and imports this module to find the registry of that scope.
"""
from mmengine.registry import Registry
from mmseg import registry as mmseg_registry

__all__ = list(mmseg_registry.__all__)

for _name in __all__:
    _parent = getattr(mmseg_registry, _name)
    globals()[_name] = Registry(_parent.name, parent=_parent, scope='mmseg_segman',
                                locations=['mmseg_segman'])
