"""One rank of ``tests/test_ddp.py``: the toy config trained under DDP over gloo on CPU
processes, through mmengine's ``Runner``, as docs/multi_gpu.md describes.

``python ddp_worker.py CONFIG DATA_ROOT WORK_DIR MAX_ITERS {fresh,resume} RECORD`` with
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; writes what
this rank did to ``RECORD`` (see :class:`RecordHook`).
"""
import sys
from datetime import timedelta
from typing import Dict

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from torch import Tensor, nn

BN = dict(type='BN', requires_grad=True)  # SyncBN runs on GPUs only


class RecordHook(Hook):
    """Records the model's state when training starts and ends, the images of every
    iteration and the iterations of the checkpoints this rank saved, and writes them to
    ``path`` at the end."""

    def __init__(self, path: str):
        self.path = path
        self.record = dict(images=[], saved=[])

    @staticmethod
    def _model(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _state(self, runner) -> Dict[str, Tensor]:
        return {name: value.detach().clone() for name, value in self._model(runner).state_dict().items()}

    def before_train(self, runner) -> None:
        self.record.update(start=self._state(runner), iter_start=runner.iter,
                           params=[name for name, _ in self._model(runner).named_parameters()])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.record['images'].append([s.img_path for s in data_batch['data_samples']])

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self.record['saved'].append(checkpoint['meta']['iter'])

    def after_train(self, runner) -> None:
        self.record.update(end=self._state(runner), iter_end=runner.iter)
        torch.save(self.record, self.path)


def main(config: str, data_root: str, work_dir: str, max_iters: str, mode: str, record: str) -> None:
    # mmengine's own 'pytorch' launcher calls torch.cuda.set_device; with the group
    # initialised here, the Runner uses it as it is.
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))
    cfg = Config.fromfile(config)
    cfg.merge_from_dict({
        'launcher': 'pytorch', 'work_dir': work_dir, 'resume': mode == 'resume',
        'model.backbone.norm_cfg': BN, 'model.decode_head.norm_cfg': BN,
        'model.data_preprocessor.size': (64, 64),
        # mmengine passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU module
        'model_wrapper_cfg': dict(type='MMDistributedDataParallel', device_ids=None),
        'train_dataloader.batch_size': 2, 'train_dataloader.dataset.data_root': data_root,
        'train_cfg.max_iters': int(max_iters),
        'val_dataloader': None, 'val_cfg': None, 'val_evaluator': None,
        'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.save_best': None,
        'default_hooks.logger.interval': 1,
    })
    runner = Runner.from_cfg(cfg)
    runner.register_hook(RecordHook(record))
    runner.train()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(*sys.argv[1:])
