"""tools/benchmark.py's bookkeeping (the measurements need a GPU): the order of repeated runs,
the arguments handed to each run's process, and the tables of several runs of a cell."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools'))
from benchmark import _without_options, render, round_order  # noqa: E402


def test_rounds_alternate_the_order_of_the_models():
    assert round_order(['segman-l', 'segformer-b4'], 3) == [
        (0, 'segman-l'), (0, 'segformer-b4'), (1, 'segformer-b4'), (1, 'segman-l'),
        (2, 'segman-l'), (2, 'segformer-b4')]


def test_each_run_gets_the_arguments_but_the_models_rounds_and_budget():
    argv = ['--mode', 'train', '--models', 'segman-l', 'segformer-b4', '--rounds=3',
            '--budget-seconds', '500', '--batches', '8', '--out', 'x.jsonl']
    assert _without_options(argv, {'--models', '--rounds', '--budget-seconds'}) == [
        '--mode', 'train', '--batches', '8', '--out', 'x.jsonl']


def row(model, img_s, peak, status='ok', round_=0):
    return dict(model=model, path='fast' if model.startswith('segman') else '-', mode='train',
                size='512', dtype='bf16', batch=8, with_cp=False, compiled=False,
                channels_last=False, round=round_, img_s=img_s, peak_gib=peak, status=status)


def test_a_cell_of_several_runs_shows_their_median_and_range(tmp_path):
    rows = [row('segman-l', 17.4, 13.4), row('segman-l', 19.5, 13.5, round_=1),
            row('segman-l', None, None, 'OOM', round_=2), row('segformer-b4', 40.5, 13.7),
            row('segnext-l', None, None, 'OOM')]
    path = tmp_path / 'runs.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    table = render([str(path)])
    assert '| segman-l | fast | 18.4 [17.4-19.5] (13.5) |' in table  # the OOM run left out
    assert '| segformer-b4 | - | 40.5 (13.7) |' in table
    assert '| segnext-l | - | OOM |' in table


def test_run_rounds_starts_one_process_a_run(monkeypatch):
    import benchmark

    calls = []
    monkeypatch.setattr(benchmark.subprocess, 'run', lambda cmd, check: calls.append(cmd))
    argv = ['--mode', 'train', '--models', 'segman-b', 'segnext-l', '--rounds', '2']
    benchmark.run_rounds(benchmark.argparse.Namespace(models=['segman-b', 'segnext-l'], rounds=2,
                                                      budget_seconds=1e9), argv)
    runs = [(cmd[cmd.index('--round') + 1], cmd[cmd.index('--models') + 1]) for cmd in calls]
    assert runs == [('0', 'segman-b'), ('0', 'segnext-l'), ('1', 'segnext-l'), ('1', 'segman-b')]
    assert all('--rounds' not in cmd and cmd[1] == benchmark.__file__ for cmd in calls)
