"""Registries of the ``mmseg_segman`` scope: children of mmseg's, so everything mmseg
registers (and SegMAN, registered into mmseg's ``MODELS``) builds from it.

mmengine tags what a config inherits through ``mmseg_segman::`` with
``_scope_='mmseg_segman'`` and imports this module to find the registry of that scope.
"""
from mmengine.registry import Registry
from mmseg import registry as mmseg_registry


class _MMSegChildRegistry(Registry):
    """A child of an mmseg registry that also makes mmseg register its modules: a lookup
    that falls through to the parent reads the parent's table without importing them."""

    def import_from_location(self) -> None:
        super().import_from_location()
        self.parent.import_from_location()


__all__ = list(mmseg_registry.__all__)

for _name in __all__:
    _parent = getattr(mmseg_registry, _name)
    globals()[_name] = _MMSegChildRegistry(_parent.name, parent=_parent, scope='mmseg_segman',
                                           locations=['mmseg_segman'])
