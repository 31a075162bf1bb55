"""The repository as a user meets it: the README's commands, the shipped CNN, the example photos."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from flowers_fastai.labels import CLASSES

from .helpers import EXAMPLES, REPO

SHIPPED = REPO / 'weights' / 'cnn_flowers.pth'

# Runs a snippet in a fresh interpreter with every socket refused, as on a machine with no network.
OFFLINE = ("import socket\n"
           "def refuse(*a, **k): raise OSError('network blocked')\n"
           "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n")


def readme_commands() -> list[str]:
    text = (REPO / 'README.md').read_text()
    return re.findall(r'```bash\n(python3 -m venv .venv .*?)\n```', text)


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.endswith('python -m flowers_fastai.predict examples/') and tests.endswith('python -m pytest -q')
    assert tests in (REPO / '.ci' / 'run').read_text()


def test_examples_hold_one_credited_photo_per_class():
    photos = sorted(EXAMPLES.glob('*.jpg'))
    credits = (EXAMPLES / 'CREDITS.md').read_text()
    assert len(photos) == 5
    for photo in photos:
        assert photo.name in credits
    for c in CLASSES:
        assert f'| {c} |' in credits


def test_shipped_cnn_is_small_and_loads_as_convnextv2():
    assert SHIPPED.is_file(), 'weights/cnn_flowers.pth is not committed'
    assert SHIPPED.stat().st_size < 30 * 2**20
    assert (REPO / 'weights' / 'README.md').is_file()
    from flowers_fastai.submit import load_cnn_model
    model = load_cnn_model(SHIPPED)
    assert type(model).__name__ == 'ConvNeXtV2' and model.head.fc.out_features == 5
    import timm   # the file is a timm state_dict: timm's own ConvNeXt V2 takes every key
    reference = timm.create_model('convnextv2_atto', num_classes=5)
    reference.load_state_dict(torch.load(SHIPPED, map_location='cpu', weights_only=True), strict=True)


def test_main_job_classifies_the_examples_offline_from_the_repo_root():
    code = OFFLINE + "from flowers_fastai.predict import main; raise SystemExit(main(['examples/']))"
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5
    for line in lines:
        path, label = line.split('\t')
        assert path.startswith('examples/') and label in CLASSES


@pytest.mark.parametrize('doc', ['README.md', 'docs/api.md'])
def test_the_docs_quote_what_the_shipped_cnn_answers(doc):
    """The tour's `predict(...)  # -> 'class'` and `predict_proba(...)  # -> {...}` lines are the shipped file's
    real answers (loaded as they show it, with its sidecar), so that new weights cannot leave them stale."""
    from flowers_fastai.submit import load_cnn_model, predict, predict_proba
    text = (REPO / doc).read_text()
    said = re.findall(r"^predict\(model, '([^']+)'\) +# -> '(\w+)'", text, re.M)
    said_proba = re.findall(r"^predict_proba\(model, '([^']+)'\) +# -> \{(.*)\}", text, re.M)
    assert said and said_proba
    model = load_cnn_model(SHIPPED)
    for photo, label in said:
        assert predict(model, REPO / photo) == label
    for photo, quoted in said_proba:
        proba = predict_proba(model, REPO / photo)
        for name, value in re.findall(r"'(\w+)': ([0-9.]+)", quoted):
            assert proba[name] == pytest.approx(float(value), abs=0.005 + 1e-9), (photo, name)


def test_default_weights_load_from_any_directory_offline(tmp_path):
    photo = sorted(EXAMPLES.glob('*.jpg'))[0]
    code = OFFLINE + ("import sys; sys.path.insert(0, %r)\n"
                      "from flowers_fastai.submit import load_cnn_model, predict, CLASSES\n"
                      "m = load_cnn_model(); print(predict(m, %r))" % (str(REPO), str(photo)))
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in CLASSES


def test_missing_vit_weights_say_how_to_make_them(tmp_path, monkeypatch):
    from flowers_fastai import submit
    monkeypatch.chdir(tmp_path)
    if (REPO / 'weights' / 'vit_flowers.pth').exists():
        pytest.skip('a vit_flowers.pth is present')
    with pytest.raises(FileNotFoundError, match='export.py'):
        submit.load_vit_model()
