"""The experiment scripts whose tables land in docs/results.md: what they run, what they skip or resume, and the
statistics they print."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from .helpers import REPO, TINY_TEACHER


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for Python that records each call's arguments, one line per call: (its path, the record)."""
    calls = tmp_path / 'calls.txt'
    stand_in = tmp_path / 'python'
    stand_in.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stand_in.chmod(0o755)
    return stand_in, calls


def fake_run(folder: Path, accuracies: list[float]) -> None:
    """A finished run folder as train.py leaves it: history.csv per epoch, metrics.json with the best epoch."""
    folder.mkdir(parents=True)
    rows = [f'scratch,{e},1.0,1.0,{a},00:01' for e, a in enumerate(accuracies)]
    (folder / 'history.csv').write_text('phase,epoch,train_loss,valid_loss,accuracy,time\n' + '\n'.join(rows) + '\n')
    (folder / 'metrics.json').write_text(json.dumps({'valid_accuracy': max(accuracies)}))


def test_distill_arms_summary_pairs_each_arm_with_no_teacher_by_seed(tmp_path):
    arms = load_script('distill_arms')
    fake_run(tmp_path / 'no-teacher-seed0', [0.3, 0.4])
    fake_run(tmp_path / 'no-teacher-seed1', [0.2, 0.5])
    fake_run(tmp_path / 'logits-seed0', [0.4, 0.5])
    fake_run(tmp_path / 'logits-seed1', [0.6, 0.4])
    fake_run(tmp_path / 'logits-T4-seed0', [0.1, 0.7])          # seed 1 not finished: paired on seed 0 only
    args = argparse.Namespace(runs=tmp_path, seeds=[0, 1], arms=['no-teacher', 'logits', 'logits-T4'])
    table, curves = arms.summary(args).split('\n\n')
    rows = {line.split(' | ')[0].strip('| '): line for line in table.splitlines()}
    assert rows['logits'] == '| logits | 0.5000 | 0.6000 | 0.5500 | 0.0707 | +0.1000 (n=2) |'
    assert rows['no-teacher'] == '| no-teacher | 0.4000 | 0.5000 | 0.4500 | 0.0707 |  |'
    assert rows['logits-T4'] == '| logits-T4 | 0.7000 | - | 0.7000 | - | +0.3000 (n=1) |'
    # the curves: mean validation accuracy per epoch over the finished seeds
    assert '| logits | 0.5000 | 0.4500 |' in curves.splitlines()
    assert '| logits-T4 | 0.1000 | 0.7000 |' in curves.splitlines()


@pytest.mark.parametrize('b, c, p', [(52, 23, 0.0011), (14, 7, 0.1892), (5, 5, 1.0), (0, 0, 1.0), (0, 6, 0.0312)])
def test_paired_compare_mcnemar_is_the_exact_two_sided_binomial_test(b, c, p):
    mcnemar = load_script('paired_compare').mcnemar_exact
    assert mcnemar(b, c) == pytest.approx(p, abs=1e-4) and mcnemar(c, b) == mcnemar(b, c)


def test_paired_compare_counts_the_photos_only_one_file_gets_right():
    discordant = load_script('paired_compare').discordant
    assert discordant([True, True, False, False, True], [True, False, True, False, False]) == (2, 1)


def test_paired_compare_line_and_the_folder_of_each_photo(tmp_path):
    line = load_script('paired_compare').comparison('flowers', [True, True, False, False], [True, False, True, True])
    assert line == ('flowers: 4 photos, accuracy A 0.5000 (2), B 0.7500 (3); right only with A: 1, only with B: 2; '
                    'McNemar exact p = 1')
    from flowers_fastai.data_files import folder_of
    first, second = tmp_path / 'flowers', tmp_path / 'flowers-flickr'   # a name that starts like the other
    (second / 'rose').mkdir(parents=True)
    (first / 'rose').mkdir(parents=True)
    assert folder_of(second / 'rose' / 'a.jpg', [first, second]) == 1
    assert folder_of(first / 'rose' / 'a.jpg', [first, second]) == 0
    with pytest.raises(ValueError, match='lies in none'):
        folder_of(tmp_path / 'elsewhere.jpg', [first, second])


def test_kd_long_seeds_trains_each_pair_on_the_teachers_split_skips_finished_runs_and_resumes(tmp_path):
    """The script's orchestration, with a stand-in for Python that records each train.py call."""
    stand_in, calls = stand_in_python(tmp_path)
    runs = tmp_path / 'runs'
    fake_run(runs / 'kd-long-teacher-seed1', [0.7])                        # finished: skipped
    (runs / 'kd-long-noteacher-seed1').mkdir(parents=True)
    (runs / 'kd-long-noteacher-seed1' / 'config.json').write_text('{}')    # interrupted: resumed
    env = {**os.environ, 'INIT': 'old.pth', 'TEACHER': 'teacher-run', 'RUNS': str(runs), 'DATA': 'photos',
           'SEEDS': '1 2', 'PYTHON': str(stand_in)}
    out = subprocess.run(['bash', 'scripts/kd_long_seeds.sh'], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    made = [line.split() for line in calls.read_text().splitlines()]
    names = [call[call.index('--name') + 1] for call in made]
    assert names == ['kd-long-noteacher-seed1', 'kd-long-teacher-seed2', 'kd-long-noteacher-seed2',
                     'kd-teacher-lite0-160-seed1', 'kd-teacher-lite0-160-seed2']
    resumed, with_teacher, without, teacher = made[0], made[1], made[2], made[3]
    assert resumed[-1] == '--resume' and '--init-from' not in resumed
    for call in (with_teacher, without, teacher):
        assert call[call.index('--split-seed') + 1] == '0' and call[call.index('--data') + 1] == 'photos'
    assert with_teacher[with_teacher.index('--seed') + 1] == '2'
    assert with_teacher[with_teacher.index('--teacher') + 1] == 'teacher-run'
    assert '--teacher' not in without and without[without.index('--init-from') + 1] == 'old.pth'
    assert teacher[1] == 'teacher' and '--init-from' not in teacher
    # without INIT the script refuses to start rather than train students from random weights
    del env['INIT']
    refused = subprocess.run(['bash', 'scripts/kd_long_seeds.sh'], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and 'INIT' in refused.stderr


def test_kd_long_report_soup_is_the_uniform_average_of_one_networks_files(tmp_path):
    import torch
    report = load_script('kd_long_report')
    a = {'w': torch.tensor([1.0, 2.0]), 'steps': torch.tensor(3)}
    b = {'w': torch.tensor([3.0, 6.0]), 'steps': torch.tensor(5)}
    torch.save(a, tmp_path / 'a.pth')
    torch.save(b, tmp_path / 'b.pth')
    out = report.soup([tmp_path / 'a.pth', tmp_path / 'b.pth'], tmp_path / 'soup.pth')
    averaged = torch.load(out, weights_only=True)
    assert torch.equal(averaged['w'], torch.tensor([2.0, 4.0])) and averaged['steps'] == 3   # integers kept
    torch.save({'other': torch.zeros(2)}, tmp_path / 'c.pth')
    with pytest.raises(SystemExit, match='same tensors'):
        report.soup([tmp_path / 'a.pth', tmp_path / 'c.pth'], tmp_path / 'bad.pth')


def test_teachers_report_scores_each_teacher_as_training_validated_it_and_refuses_mixed_splits(colour_folder,
                                                                                             tmp_path, capsys):
    from flowers_fastai.training import train
    runs = {}
    for name, seed in (('a', 0), ('b', 0), ('other-split', 1)):
        runs[name] = tmp_path / name
        train(TINY_TEACHER.override(seed=seed), colour_folder, runs[name], pretrained=False, split='stratified')
    report = load_script('teachers_report')
    assert report.main(['--teachers', str(runs['a']), str(runs['b']), '--sizes', '24']) == 0
    lines = capsys.readouterr().out.splitlines()
    own = {line.split(' |')[0][2:]: float(line.split('|')[2]) for line in lines if '(own)' in line}
    for name in ('a', 'b'):   # the validation accuracy training recorded, on the same eval crop
        metrics = json.loads((runs[name] / 'metrics.json').read_text())
        assert own[f'{name}, 32 px (own)'] == pytest.approx(metrics['valid_accuracy'], abs=1e-4)
    assert any(line.startswith('| a, 24 px |') for line in lines)
    assert any(line.startswith('| ensemble of 2, own size |') for line in lines)
    with pytest.raises(SystemExit, match='other photos'):
        report.main(['--teachers', str(runs['a']), str(runs['other-split'])])


def test_data_arms_compare_at_equal_steps_on_the_teachers_split_and_report_each_folder(tmp_path):
    arms = load_script('data_arms')
    args = argparse.Namespace(runs=tmp_path, data=[Path('/d/flowers'), Path('/d/flickr')], epochs=24, split_seed=0,
                              teachers=[Path('/t/lite0'), Path('/t/lite1'), Path('/t/lite2')], teacher_size=128,
                              seeds=[0, 1], arms=list(arms.ARMS))
    photos = {1: 3109, 2: 5530}
    one, two = arms.command(args, 'one-folder', 0, photos), arms.command(args, 'two-folders', 0, photos)
    assert one[one.index('--data') + 1:one.index('--arch')] == ['/d/flowers']
    assert int(one[one.index('--epochs') + 1]) == round(24 * 5530 / 3109) == 43   # as many steps as 24 on both
    assert two[two.index('--data') + 1:two.index('--arch')] == ['/d/flowers', '/d/flickr']
    assert '--teacher' not in one and '--teacher' not in two
    lite0, ensemble = arms.command(args, 'lite0', 1, photos), arms.command(args, 'ensemble', 1, photos)
    assert lite0[lite0.index('--teacher') + 1:lite0.index('--teacher-size')] == ['/t/lite0']
    assert ensemble[ensemble.index('--teacher') + 1:ensemble.index('--teacher-size')] == ['/t/lite0', '/t/lite1',
                                                                                           '/t/lite2']
    assert all(c[c.index('--split-seed') + 1] == '0' for c in (one, two, lite0, ensemble))
    (tmp_path / 'lite0-seed1').mkdir()
    (tmp_path / 'lite0-seed1' / 'config.json').write_text('{}')   # interrupted: resumed from its own config
    assert arms.command(args, 'lite0', 1, photos)[-1] == '--resume'
    for arm, seed, first, second in [('one-folder', 0, 0.70, None), ('one-folder', 1, 0.72, None),
                                     ('two-folders', 0, 0.74, 0.80), ('two-folders', 1, 0.76, 0.84)]:
        folder = tmp_path / f'{arm}-seed{seed}'
        folder.mkdir()
        metrics = {'valid_accuracy': first if second is None else (first + second) / 2}
        if second is not None:
            metrics['valid_accuracy_by_folder'] = {'flowers': first, 'flickr': second}
        (folder / 'metrics.json').write_text(json.dumps(metrics))
    table = arms.summary(args).splitlines()
    assert table[2] == '| one-folder | 0.7000 | 0.7200 | 0.7100 +/- 0.0141 | - | - |'
    assert table[3] == '| two-folders | 0.7400 | 0.7600 | 0.7500 +/- 0.0141 | 0.8200 +/- 0.0283 | 0.7850 +/- 0.0212 |'
    assert table[4].startswith('| lite0 | - | - | - |')


def write_config(folder: Path, bs: int) -> None:
    """A run's whole config.json, as training writes it, with batch size `bs`."""
    from flowers_fastai.preprocess import cnn_preprocessing
    from flowers_fastai.run_config import RunConfig
    config = RunConfig(recipe=TINY_TEACHER.override(bs=bs), preprocessing=cnn_preprocessing(32), data=('photos',))
    (folder / 'config.json').write_text(json.dumps(config.to_dict()))


def test_data_arms_read_each_history_at_equal_steps(tmp_path):
    """4 epochs of 10 steps on both folders against 7 of 6 on the first: at 20 and 40 steps, the one-folder arm is
    read at its 3rd and 6th epoch (18 and 36 steps), the two-folder arms at their 2nd and 4th."""
    arms = load_script('data_arms')
    args = argparse.Namespace(runs=tmp_path, data=[Path('/d/flowers'), Path('/d/flickr')], epochs=4, seeds=[0, 1],
                              arms=['one-folder', 'two-folders', 'lite0'])
    for arm, n_epochs in [('one-folder', 7), ('two-folders', 4)]:
        folder = tmp_path / f'{arm}-seed0'
        folder.mkdir()
        (folder / 'metrics.json').write_text('{}')
        write_config(folder, bs=32)
        column = 'accuracy' if arm == 'one-folder' else 'accuracy,accuracy_flowers'
        lines = [f'epoch,{column}'] + [f'{e},' + ('' if arm == 'one-folder' else '0.9,') + f'0.{e + 1}'
                                       for e in range(n_epochs)]
        (folder / 'history.csv').write_text('\n'.join(lines) + '\n')
    table = arms.equal_steps(args, {1: 6 * 32 + 5, 2: 10 * 32 + 31}, checkpoints=2).splitlines()
    assert table[0] == '| steps | seed | one-folder | two-folders | lite0 |'
    assert table[2:] == ['| 20 | 0 | 0.3000 | 0.2000 | - |', '| 40 | 0 | 0.6000 | 0.4000 | - |']   # seed 1 has no finished run: no row
    write_config(tmp_path / 'two-folders-seed0', bs=64)     # no step count fits both arms' cells: refused
    with pytest.raises(SystemExit, match='different batch sizes.*one-folder-seed0: 32, two-folders-seed0: 64'):
        arms.equal_steps(args, {1: 6 * 32 + 5, 2: 10 * 32 + 31}, checkpoints=2)


def test_long_run_trains_the_teachers_then_the_student_they_teach_skipping_and_resuming(tmp_path):
    """scripts/long_run.sh's orchestration, with a stand-in for Python that records each train.py call."""
    stand_in, calls = stand_in_python(tmp_path)
    runs = tmp_path / 'runs'
    fake_run(runs / 'teacher-lite0-160', [0.93])                       # finished: skipped
    (runs / 'teacher-lite1-160').mkdir(parents=True)
    (runs / 'teacher-lite1-160' / 'config.json').write_text('{}')     # interrupted: resumed
    env = {**os.environ, 'RUNS': str(runs), 'DATA': 'a b', 'PYTHON': str(stand_in), 'SEED': '2', 'EPOCHS': '7'}
    out = subprocess.run(['bash', 'scripts/long_run.sh'], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    made = [line.split() for line in calls.read_text().splitlines()]
    assert [call[call.index('--name') + 1] for call in made] == ['teacher-lite1-160', 'teacher-lite2-160',
                                                                 'long-lite012-seed2', 'stretch224-lite012-seed2']
    resumed, lite2, student, stretch = made
    assert resumed[-1] == '--resume' and '--arch' not in resumed
    assert lite2[lite2.index('--arch') + 1] == 'tf_efficientnet_lite2'
    for call in (lite2, student):
        assert call[call.index('--data') + 1:call.index('--data') + 3] == ['a', 'b']
    assert student[student.index('--teacher') + 1:student.index('--teacher') + 4] == \
        [str(runs / f'teacher-lite{n}-160') for n in range(3)]
    assert student[student.index('--epochs') + 1] == '7' and student[student.index('--seed') + 1] == '2'
    assert student[student.index('--resize-to') + 1] == '224' and '--no-pretrained' in student
    assert student[student.index('--resize-epochs') + 1] == '10'   # 4 left the 224 px ending still climbing
    # the stretch that made the shipped file: from the student, at 224 px, the same teachers at their own 160 px
    assert stretch[stretch.index('--init-from') + 1] == str(runs / 'long-lite012-seed2')
    assert stretch[stretch.index('--size') + 1] == '224' and stretch[stretch.index('--epochs') + 1] == '10'
    assert stretch[stretch.index('--teacher') + 1:stretch.index('--teacher-size')] == \
        [str(runs / f'teacher-lite{n}-160') for n in range(3)]
    assert stretch[stretch.index('--teacher-size') + 1] == '160' and stretch[stretch.index('--seed') + 1] == '2'
    assert stretch[stretch.index('--data') + 1:stretch.index('--data') + 3] == ['a', 'b']


def test_long_run_with_one_teacher_names_the_student_after_it(tmp_path):
    stand_in, calls = stand_in_python(tmp_path)
    runs = tmp_path / 'runs'
    fake_run(runs / 'teacher-lite0-160', [0.93])
    env = {**os.environ, 'RUNS': str(runs), 'DATA': 'a b', 'PYTHON': str(stand_in), 'TEACHERS': '0',
           'STRETCH_EPOCHS': '0'}   # 0: no stretch after the student
    out = subprocess.run(['bash', 'scripts/long_run.sh'], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (student,) = [line.split() for line in calls.read_text().splitlines()]
    assert student[student.index('--name') + 1] == 'long-lite0-seed0'
    assert student[student.index('--teacher') + 1:student.index('--teacher-size')] == [str(runs / 'teacher-lite0-160')]


def test_distill_arms_pass_every_data_folder_to_train_py(tmp_path, monkeypatch):
    arms = load_script('distill_arms')
    calls = []
    monkeypatch.setattr(arms.subprocess, 'run', lambda cmd, **kwargs: calls.append(cmd))
    args = argparse.Namespace(runs=tmp_path, data=[Path('/d/flowers'), Path('/d/flickr')], teacher=Path('/t'),
                              teacher_size=128, epochs=4, split_seed=0)
    arms.train(args, 'logits', 0)
    cmd = calls[0]
    assert cmd[cmd.index('--data') + 1:cmd.index('--runs')] == ['/d/flowers', '/d/flickr']
