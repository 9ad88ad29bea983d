"""mmengine's loops, refusing a dataset without samples before the first iteration.

mmengine builds a loop's dataset with the loop (``Runner.train`` builds the train and val
loops, ``Runner.test`` the test loop, before any iteration). A dataset that finds no samples
ends mmengine 0.10.7 in its ``ValueError: need at least one array to concatenate`` (it
serialises the empty data list); with ``serialize_data=False``, training would wait forever
on an ``InfiniteSampler`` of nothing. These loops, which the segman configs use, say instead
which dataset found nothing, where it looked, and which config key points it there.
"""
from typing import Optional, Union

from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS
from mmengine.runner import IterBasedTrainLoop, TestLoop, ValLoop
from mmseg.datasets import BaseSegDataset
from mmseg.registry import LOOPS
from torch.utils.data import DataLoader


class EmptyDatasetError(ValueError):
    """A loop's dataset holds no samples."""


def _described(dataset: BaseDataset) -> str:
    """``dataset``'s type and, for mmseg's datasets, where it looks for samples."""
    name = type(dataset).__name__
    if not isinstance(dataset, BaseSegDataset):
        return name
    prefix = dataset.data_prefix
    listed = f' listed in {dataset.ann_file}' if dataset.ann_file else ''
    return (f"{name} (images ending in {dataset.img_suffix!r}{listed} under {prefix.get('img_path')}, "
            f"annotations ending in {dataset.seg_map_suffix!r} in {prefix.get('seg_map_path')})")


def _empty_dataset(dataloader: Union[DataLoader, dict]) -> Optional[BaseDataset]:
    """The dataset of the config ``dataloader``, built without loading, if it finds no samples."""
    cfg = dataloader.get('dataset') if isinstance(dataloader, dict) else None
    if not isinstance(cfg, dict):
        return None
    dataset = DATASETS.build({**cfg, 'lazy_init': True})
    return dataset if isinstance(dataset, BaseDataset) and not dataset.load_data_list() else None


class _RefusesEmptyDataset:
    """Builds the loop, then raises :class:`EmptyDatasetError` if its dataset is empty."""
    dataloader_key: str  # the config key of the loop's dataloader

    def __init__(self, runner, dataloader: Union[DataLoader, dict], *args, **kwargs) -> None:
        try:
            super().__init__(runner, dataloader, *args, **kwargs)
        except ValueError:  # mmengine's, serialising an empty data list
            empty = _empty_dataset(dataloader)
            if empty is None:
                raise
            raise EmptyDatasetError(self._message(empty)) from None
        if len(self.dataloader.dataset) == 0:
            raise EmptyDatasetError(self._message(self.dataloader.dataset))

    def _message(self, dataset: BaseDataset) -> str:
        return (f'{self.dataloader_key}: the {_described(dataset)} found no samples. Point '
                f'{self.dataloader_key}.dataset at the data: its data_root, data_prefix, '
                'img_suffix, seg_map_suffix, ann_file.')


@LOOPS.register_module()
class NonEmptyIterBasedTrainLoop(_RefusesEmptyDataset, IterBasedTrainLoop):
    """mmengine's ``IterBasedTrainLoop``; refuses an empty ``train_dataloader`` dataset."""
    dataloader_key = 'train_dataloader'


@LOOPS.register_module()
class NonEmptyValLoop(_RefusesEmptyDataset, ValLoop):
    """mmengine's ``ValLoop``; refuses an empty ``val_dataloader`` dataset."""
    dataloader_key = 'val_dataloader'


@LOOPS.register_module()
class NonEmptyTestLoop(_RefusesEmptyDataset, TestLoop):
    """mmengine's ``TestLoop``; refuses an empty ``test_dataloader`` dataset."""
    dataloader_key = 'test_dataloader'
