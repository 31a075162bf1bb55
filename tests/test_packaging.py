"""What `pip install .` gives a user (not the editable install of the README and CI): a wheel built from the repo,
installed offline into a fresh virtual environment, imports, finds the shipped weights and classifies."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from .helpers import EXAMPLES, REPO


def test_a_wheel_installed_offline_imports_loads_the_shipped_cnn_and_classifies(tmp_path):
    wheels = tmp_path / 'wheels'
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                            '-q', '-w', str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel, = wheels.glob('flowers_fastai-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert {'flowers_fastai/families/__init__.py', 'flowers_fastai/delivery/__init__.py', 'flowers_fastai/submit.py'} \
        <= set(names)
    assert not any(name.startswith(('tests/', 'scripts/')) for name in names)

    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=300)
    python = venv / 'bin' / 'python'
    # the new environment's own pip: this one's would first uninstall the flowers_fastai it runs the tests with
    install = subprocess.run([str(python), '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    # its dependencies (torch, timm ...) from this environment, after its own site-packages: no download
    own_site = next((venv / 'lib').glob('python3*/site-packages'))
    (own_site / 'deps.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    elsewhere = tmp_path / 'elsewhere'   # no weights/ here: the installed copy must be found
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'FLOWERS_WEIGHTS')}
    photo = EXAMPLES / '100930342_92e8746431_n.jpg'
    code = ('import flowers_fastai, flowers_fastai.submit as s; m = s.load_cnn_model(); '
            f'print(flowers_fastai.__file__); print(s.find_weights("cnn_flowers.pth")); print(s.predict(m, {str(photo)!r}))')
    out = subprocess.run([str(python), '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    package, weights, label = out.stdout.split()
    assert Path(package).is_relative_to(venv) and Path(weights) == venv / 'share/flowers_fastai/weights/cnn_flowers.pth'
    assert label == 'tulip'   # what the shipped file answers from the checkout (README, docs/api.md)
    cli = subprocess.run([str(python), '-m', 'flowers_fastai.predict', str(EXAMPLES)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f'{photo}\ttulip' in cli.stdout.splitlines() and len(cli.stdout.splitlines()) == 5


def test_a_missing_weights_file_names_every_place_searched(tmp_path, monkeypatch):
    import pytest
    from flowers_fastai import submit
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('FLOWERS_WEIGHTS', str(tmp_path / 'mine'))
    with pytest.raises(FileNotFoundError) as err:
        submit.find_weights('vit_flowers.pth', 'vit')
    for folder in (tmp_path, tmp_path / 'mine', submit.WEIGHTS_DIR, submit.INSTALLED_WEIGHTS_DIR):
        assert str(folder / 'vit_flowers.pth') in str(err.value)
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'vit_flowers.pth').write_bytes(b'x')
    assert submit.find_weights('vit_flowers.pth') == tmp_path / 'mine' / 'vit_flowers.pth'
