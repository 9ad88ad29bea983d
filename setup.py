"""mmseg-segman: SegMAN (CVPR 2025) as a plugin for MMSegmentation 1.x.

Like OpenMMLab's packages, the package carries its configs, model index and tools in
``mmseg_segman/.mim/`` (symlinks to ``configs/``, ``model-index.yml`` and ``tools/``, made
here: an editable install sees the repository's files, a wheel gets copies), so configs can
inherit ``mmseg_segman::segman/<config>.py``, ``mim search mmseg_segman`` lists the models and
``mim run mmseg_segman <tool>`` runs ``tools/**/<tool>.py``.
``mmseg_segman_scope.pth`` teaches mmengine that scope (see mmseg_segman_scope.py).
"""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = osp.dirname(osp.abspath(__file__))
MIM_FILES = ('configs', 'model-index.yml', 'tools')
SCOPE_PTH = 'mmseg_segman_scope.pth'


def add_mim_extension() -> None:
    """Link ``configs/``, ``model-index.yml`` and ``tools/`` into ``mmseg_segman/.mim/``."""
    mim_dir = osp.join(ROOT, 'mmseg_segman', '.mim')
    os.makedirs(mim_dir, exist_ok=True)
    for name in MIM_FILES:
        link = osp.join(mim_dir, name)
        if osp.lexists(link):
            if not osp.islink(link):
                raise RuntimeError(f'{link} should be a symlink to ../../{name}; remove it')
            os.remove(link)
        os.symlink(osp.join('..', '..', name), link)


class BuildPyWithScope(build_py):
    """build_py that also puts the start-up hook's .pth at the top of the install."""

    def run(self):
        super().run()
        self.copy_file(osp.join(ROOT, SCOPE_PTH), osp.join(self.build_lib, SCOPE_PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [osp.join(self.build_lib, SCOPE_PTH)]


class EditableWheelWithScope(editable_wheel):
    """editable_wheel that also installs the start-up hook's .pth (build_py's extra files
    do not reach an editable wheel)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(osp.join(ROOT, SCOPE_PTH), installation_dir)


add_mim_extension()
setup(
    name='mmseg-segman',
    version='0.1.0',
    description='SegMAN semantic segmentation models for MMSegmentation 1.x',
    packages=find_packages(include=['mmseg_segman', 'mmseg_segman.*']),
    py_modules=['mmseg_segman_scope'],
    package_data={'mmseg_segman': ['.mim/model-index.yml', '.mim/configs/**/*.py',
                                   '.mim/configs/**/*.yaml', '.mim/tools/**/*.py']},
    cmdclass={'build_py': BuildPyWithScope, 'editable_wheel': EditableWheelWithScope},
    python_requires='>=3.9',
    # What the package imports. mmcv needs its compiled ops: install it first (mim install
    # mmcv, or tools/setup_env.sh's build); with the stack present pip installs nothing else.
    install_requires=['numpy', 'torch>=2.0', 'mmengine>=0.10.0,<1.0.0', 'mmcv>=2.0.0rc4,<2.2.0',
                      'mmsegmentation>=1.0.0,<1.3.0'],
)
