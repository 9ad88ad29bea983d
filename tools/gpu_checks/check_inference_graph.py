"""Whether SegMAN's inference replayed as CUDA graphs (``cuda_graph=True``, encoder and head)
gives eager's predictions, and how long a batch takes each way.

    python3 tools/gpu_checks/check_inference_graph.py --models segman-t segman-l \
        --batches 1 16 --out graph.jsonl

For each model, one eager and one graphed copy with the same weights, ``torch.inference_mode``:

* ``max_diff``: the largest difference between their logits (``model(images, mode='tensor')``)
  over three sizes called in turn three times each (512x512, 512x683, 683x512), float32 and
  bf16 autocast, bf16 again after new weights are loaded into both in place, and between
  their ``predict`` label maps (mmseg's test path, batch 1, the logits resized to the image)
  as the count of pixels that differ;
* ``eager_ms`` / ``graph_ms``: wall time a batch of 512x512 bf16 images at each ``--batches``,
  the median of 20 calls, the GPU synchronised around each (the graph captured before);
* ``graphs``: how many graphs each module captured in the comparisons (released before the
  timings, so that each batch gets its own); ``reserved_gib`` after the run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from mmengine.config import ConfigDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_model, data_samples, write_row  # noqa: E402  (tools/benchmark.py)
from check_training_graph import graphed  # noqa: E402

SIZES = [(512, 512), (512, 683), (683, 512)]


def logits_difference(eager, graph, dtype) -> float:
    worst = 0.0
    with torch.inference_mode(), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(3):
            for height, width in SIZES:
                images = torch.randn(2, 3, height, width, device='cuda')
                expected, got = eager(images, mode='tensor'), graph(images, mode='tensor')
                worst = max(worst, (expected.float() - got.float()).abs().max().item())
    return worst


def predict_difference(eager, graph) -> int:
    differing = 0
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
        for _ in range(3):
            for height, width in SIZES:
                images = torch.randn(1, 3, height, width, device='cuda')
                expected = eager.predict(images, data_samples(1, height, width))
                got = graph.predict(images, data_samples(1, height, width))
                differing += sum(int((a.pred_sem_seg.data != b.pred_sem_seg.data).sum())
                                 for a, b in zip(expected, got))
    return differing


def reloaded_difference(eager, graph) -> float:
    """:func:`logits_difference` in bf16 after new weights are loaded into both copies in
    place (``load_state_dict``, as a checkpoint loaded after the graphs' capture): a replay
    must not read copies made of the old weights (the 1x1 weights kept in bf16)."""
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in eager.state_dict().items()}
    eager.load_state_dict(state)
    graph.load_state_dict(state)
    return logits_difference(eager, graph, torch.bfloat16)


def release(model) -> None:
    for module in (model.backbone, model.decode_head):
        module.cuda_graphs.inference.release()


def batch_ms(model, batch: int) -> float:
    images = torch.randn(batch, 3, 512, 512, device='cuda')
    times = []
    with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
        for i in range(23):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(images, mode='tensor')
            torch.cuda.synchronize()
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['segman-t'],
                        choices=['segman-t', 'segman-s', 'segman-b', 'segman-l'])
    parser.add_argument('--batches', nargs='+', type=int, default=[1, 16])
    parser.add_argument('--out', help='append JSON lines here')
    args = parser.parse_args()
    for name in args.models:
        torch.manual_seed(0)
        eager = build_model(name).eval()
        eager.test_cfg = ConfigDict(eager.test_cfg)  # predict reads test_cfg.mode
        graph = graphed(eager).eval()
        row = dict(model=name,
                   max_diff={'fp32': logits_difference(eager, graph, torch.float32),
                             'bf16': logits_difference(eager, graph, torch.bfloat16),
                             'bf16_reloaded': reloaded_difference(eager, graph)},
                   predict_pixels_differing=predict_difference(eager, graph))
        row['graphs'] = {m: len(getattr(graph, m).cuda_graphs.inference._graphs)
                         for m in ('backbone', 'decode_head')}
        for batch in args.batches:
            release(graph)
            row[f'b{batch}'] = dict(eager_ms=batch_ms(eager, batch), graph_ms=batch_ms(graph, batch))
        row['reserved_gib'] = round(torch.cuda.memory_reserved() / 2 ** 30, 2)
        write_row(row, args.out)
        del eager, graph
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
