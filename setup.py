"""mmseg-segman: SegMAN (CVPR 2025) as a plugin for MMSegmentation 1.x."""
from setuptools import find_packages, setup

setup(
    name='mmseg-segman',
    version='0.1.0',
    description='SegMAN semantic segmentation models for MMSegmentation 1.x',
    packages=find_packages(include=['mmseg_segman', 'mmseg_segman.*']),
    python_requires='>=3.9',
    install_requires=[],
)
