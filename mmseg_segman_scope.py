"""Adds the ``mmseg_segman`` package scope to mmengine's config loader.

mmengine resolves ``_base_ = ['pkg::path']`` only for the packages in its hard-coded
``mmengine.config.utils.MODULE2PACKAGE``. ``mmseg_segman_scope.pth`` imports this module at
interpreter start-up; it adds ``mmseg_segman`` to that table when mmengine's module is
imported (it imports nothing heavy itself). The scope maps to the module
``mmseg_segman.registry`` rather than to the distribution, so that mmengine locates
``mmseg_segman/.mim/configs`` through the module's file: right for editable installs too,
where the distribution's location is site-packages.
"""
import sys
from importlib.machinery import PathFinder

TARGET = 'mmengine.config.utils'


def register(module) -> None:
    """Add the scope to ``module.MODULE2PACKAGE`` (``module`` is mmengine.config.utils)."""
    module.MODULE2PACKAGE.setdefault('mmseg_segman', 'mmseg_segman.registry')


class _ScopeFinder:
    """Meta path finder that lets mmengine.config.utils load, then registers the scope."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != TARGET:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Register now if mmengine's config utils are loaded, else when they are."""
    if TARGET in sys.modules:
        register(sys.modules[TARGET])
    elif not any(isinstance(f, _ScopeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ScopeFinder())


install()
