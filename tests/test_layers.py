"""The package's two layers: the delivery core (what `submit` needs) imports nothing from training, and no module
takes part in an import cycle. docs/design.md draws the map these tests enforce."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / 'flowers_fastai'

# The delivery core: submit, the preprocessing, the delivered networks and their registry, inference, and the
# command-line tools over delivered files. `recipes` and `labels` are plain data that both layers share.
CORE = {'labels', 'recipes', 'run_config', 'data_files', 'preprocess', 'architectures', 'inference',
        'inference_nets', 'weights_io', 'sidecar', 'delivery', 'delivery.entry', 'delivery.cnn', 'delivery.vit',
        'submit', 'calibration', 'metrics', 'predict', 'evaluate', 'app'}
# The training side: may import the core, never the other way round.
TRAINING = {'families', 'families.entry', 'families.cnn', 'families.vit', 'families.teacher', 'training',
            'notebook', 'callbacks', 'checkpoints', 'data', 'photo_cache', 'audit', 'exporting', 'run_folder',
            'teachers', 'distill', 'lora', 'models', 'pretrained', 'experiments', 'recipe_options'}
# Third-party packages the core never imports, not even inside a function.
TRAINING_LIBRARIES = {'fastai', 'fastcore', 'sklearn.model_selection', 'imagehash', 'huggingface_hub'}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level?) for every import in the file, relative ones resolved to names
    inside the package ('' is the package itself); absolute ones as written."""
    me = module_name(path)
    package = me.split('.') if path.name == '__init__.py' and me else me.split('.')[:-1] if me else []
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module
                if base == 'flowers_fastai' or base.startswith('flowers_fastai.'):
                    base = '.' + base.removeprefix('flowers_fastai').lstrip('.')
                else:
                    found.append((base, node.lineno, id(node) in top_level))
                    continue
                anchor = []
            else:
                anchor = package[:len(package) - (node.level - 1)]
                base = '.' + (node.module or '')
            target = '.'.join(anchor + [p for p in base.lstrip('.').split('.') if p])
            for alias in node.names:   # `from . import cnn` imports a submodule
                sub = f'{target}.{alias.name}' if target else alias.name
                name = sub if (PACKAGE / sub.replace('.', '/')).with_suffix('.py').exists() or \
                    (PACKAGE / sub.replace('.', '/') / '__init__.py').exists() else target
                found.append(('@' + name, node.lineno, id(node) in top_level))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it names in an import (module or function level). A registry package
    imports its entries, which import the entry type from a sibling module, never from the package: Python
    runs a package's `__init__` before its modules, an arrow this graph leaves out."""
    return {module_name(path): {name[1:] for name, _, _ in imports_of(path) if name.startswith('@')}
            - {module_name(path), ''} for path in sorted(PACKAGE.rglob('*.py'))}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_one_layer():
    modules = {module_name(p) for p in PACKAGE.rglob('*.py')} - {''}
    assert not CORE & TRAINING
    assert modules == CORE | TRAINING, 'place each new module in CORE or TRAINING (docs/design.md)'


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_walker_sees_a_cycle_and_a_function_level_arrow(tmp_path, monkeypatch):
    """The walker itself: a cycle closed by an import inside a function is found."""
    package = tmp_path / 'flowers_fastai'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'a.py').write_text('from .b import x\n')
    (package / 'b.py').write_text('def f():\n    from . import a\n')
    monkeypatch.setattr(sys.modules[__name__], 'PACKAGE', package)
    assert cycles(graph()) == [['a', 'b']]


def test_the_core_imports_nothing_from_training():
    upward = []
    for path in sorted(PACKAGE.rglob('*.py')):
        me = module_name(path)
        if me not in CORE:
            continue
        for name, line, _ in imports_of(path):
            target = name[1:] if name.startswith('@') else None
            if target is not None and (target in TRAINING or target.split('.')[0] in TRAINING):
                upward.append(f'{path.relative_to(REPO)}:{line} imports {target}')
            if target is None and any(name == lib or name.startswith(lib + '.') for lib in TRAINING_LIBRARIES):
                upward.append(f'{path.relative_to(REPO)}:{line} imports {name}')
    assert upward == []


def test_the_package_root_imports_training_only_when_the_notebook_face_is_asked_for():
    """`flowers_fastai/__init__.py` runs before every core module: at module level it may import the core only."""
    at_top = [name[1:] for name, _, top in imports_of(PACKAGE / '__init__.py') if top and name.startswith('@')]
    assert at_top and all(name in CORE for name in at_top)


def test_the_core_predicts_with_every_training_module_blocked(tmp_path):
    """A process where fastai and every training module fail to import still loads both families and
    predicts: the core stands alone."""
    blocked = sorted(f'flowers_fastai.{m}' for m in TRAINING) + ['fastai', 'fastcore', 'timm', 'open_clip']
    script = textwrap.dedent(f'''
        import importlib.abc, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + '.') for b in BLOCKED):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import torch
        from PIL import Image
        sys.path.insert(0, {str(REPO)!r})
        from flowers_fastai import submit
        from flowers_fastai.inference_nets import ConvNeXtV2, ClipViTClassifier
        from flowers_fastai.architectures import CONVNEXTV2_SIZES, ClipTowerSpec
        torch.manual_seed(0)
        cnn = ConvNeXtV2(*CONVNEXTV2_SIZES['atto'])
        torch.save(cnn.state_dict(), {str(tmp_path / 'cnn.pth')!r})
        spec = ClipTowerSpec(image_size=32, patch_size=16, width=64, layers=1, output_dim=16)
        torch.save(ClipViTClassifier(spec).state_dict(), {str(tmp_path / 'vit.pth')!r})
        Image.new('RGB', (40, 30), 'yellow').save({str(tmp_path / 'photo.jpg')!r})
        for load, name in ((submit.load_cnn_model, 'cnn.pth'), (submit.load_vit_model, 'vit.pth')):
            model = load({str(tmp_path)!r} + '/' + name)
            print(submit.predict(model, {str(tmp_path / 'photo.jpg')!r}))
        print(sorted(m for m in sys.modules if m.startswith('flowers_fastai.')))
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert all(line in submit_classes() for line in lines[:2])
    loaded = {m.removeprefix('flowers_fastai.') for m in eval(lines[2])}   # noqa: S307 - our own output
    assert loaded <= CORE


def submit_classes():
    from flowers_fastai.labels import CLASSES
    return CLASSES


def test_no_core_module_imports_fastai():
    """Each core module imported in turn, in one process: the first that pulls fastai in is named."""
    script = textwrap.dedent(f'''
        import importlib, sys
        for module in {sorted(CORE)!r}:
            importlib.import_module('flowers_fastai.' + module)
            if any(m.split('.')[0] in ('fastai', 'fastcore') for m in sys.modules):
                print(module)
                break
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ''
