"""The registry of model families: each family's preprocessing follows its weights, the delivery defaults agree
with timm's configuration, a sidecar's preprocessing is what the loader feeds, and a new family is one entry."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from flowers_fastai import delivery, families, predict, submit, training
from flowers_fastai.delivery import DELIVERIES, Delivery, delivery_of
from flowers_fastai.families import FAMILIES, Family
from flowers_fastai.inference import Served
from flowers_fastai.labels import CLASSES
from flowers_fastai.models import create_model
from flowers_fastai.preprocess import Preprocessing
from flowers_fastai.recipes import CNN, RECIPES

from .helpers import real_photos


def test_every_recipe_has_one_family_entry_and_the_delivered_ones_are_cnn_and_vit():
    assert set(FAMILIES) == set(RECIPES)
    assert all(FAMILIES[name].recipe == RECIPES[name] and FAMILIES[name].name == name for name in FAMILIES)
    assert tuple(DELIVERIES) == ('cnn', 'vit')
    assert [FAMILIES[n].delivery.loader for n in DELIVERIES] == ['load_cnn_model', 'load_vit_model']
    assert all(FAMILIES[n].delivery is DELIVERIES[n] for n in DELIVERIES) and FAMILIES['teacher'].delivery is None


def test_the_brief_loaders_take_their_names_and_default_files_from_the_registry():
    import inspect
    for name, entry in DELIVERIES.items():
        loader = getattr(submit, entry.loader)
        assert loader is submit.loader_for(name) and loader.__name__ == entry.loader
        assert inspect.signature(loader).parameters['weights_path'].default == entry.weights_file
    assert (DELIVERIES['cnn'].weights_file, DELIVERIES['vit'].weights_file) == ('cnn_flowers.pth', 'vit_flowers.pth')


def test_preprocessing_follows_the_weight_tag():
    vit, cnn = FAMILIES['vit'].preprocessing, FAMILIES['cnn'].preprocessing
    assert vit('ViT-L-14-quickgelu', 'openai', 224).mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert vit('ViT-L-14', 'laion2b_s32b_b82k', 224).mean == (0.5, 0.5, 0.5)   # OpenCLIP's own statistics
    assert cnn('convnextv2_tiny', 'fcmae_ft_in22k_in1k', 224).crop_pct == 0.875
    assert cnn('convnextv2_tiny', 'fcmae_ft_in22k_in1k_384', 384).crop_pct == 1.0
    teacher = FAMILIES['teacher'].preprocessing('tf_efficientnet_lite0', '', 160)
    assert (teacher.mean, teacher.std, teacher.size) == ((0.5,) * 3, (0.5,) * 3, 160)


def test_the_loaders_defaults_without_a_sidecar_are_timms_for_the_default_weights(tiny_cnn_file, tmp_path):
    """`submit` does not import timm: its no-sidecar CNN preprocessing is a constant, checked here against
    timm's configuration of the recipe's weights."""
    bare = tmp_path / 'cnn_flowers.pth'
    bare.write_bytes(tiny_cnn_file.read_bytes())
    loaded = submit.load_cnn_model(bare).flowers_preprocessing
    assert loaded == FAMILIES['cnn'].preprocessing(CNN.arch, CNN.pretrained_tag, 224)


def test_the_sidecars_preprocessing_is_what_the_loader_feeds(tiny_cnn_file, tmp_path):
    path = tmp_path / 'cnn_flowers.pth'
    path.write_bytes(tiny_cnn_file.read_bytes())
    path.with_suffix('.json').write_text(json.dumps({'family': 'cnn', 'image_size': 64, 'crop_pct': 1.0,
                                                     'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}))
    assert submit.load_cnn_model(path).flowers_preprocessing == Preprocessing(64, 1.0, (0.5,) * 3, (0.5,) * 3)
    for field, value in [('mean', [0.5, 0.5]), ('std', [0.5, 0.0, 0.5]), ('crop_pct', 0), ('mean', 'imagenet')]:
        path.with_suffix('.json').write_text(json.dumps({'family': 'cnn', field: value}))
        with pytest.raises(ValueError, match=f'field "{field}"'):
            submit.load_cnn_model(path)


class _Toy(Served):
    def __init__(self):
        super().__init__()
        self.toy_head = nn.Linear(3 * 16 * 16, len(CLASSES))

    def forward(self, x):
        return self.toy_head(x.flatten(1))


def _toy_family() -> Family:
    pp = Preprocessing(16, 1.0, (0.5,) * 3, (0.5,) * 3)

    def loaded(state, *_):
        model = _Toy()
        model.load_state_dict(state)
        return model
    return Family(name='toy', recipe=dataclasses.replace(CNN, family='toy', size=16),
                  create=lambda recipe, pretrained: _Toy(), splitter=lambda m: [[m.toy_head.weight], [m.toy_head.bias]],
                  preprocessing=lambda arch, tag, size: dataclasses.replace(pp, size=size),
                  trained_network=loaded,
                  delivery=Delivery(name='toy', title='a toy linear', weights_file='toy_flowers.pth',
                                    head_key='toy_head.weight', owns=lambda state: 'toy_head.weight' in state,
                                    build=lambda state, sidecar, path: (loaded(state), pp),
                                    sidecar_fields=lambda config, model: {},
                                    network_config=lambda state, sidecar: {}))


@pytest.fixture
def toy_family():
    """The toy family registered with one call, and gone again after the test."""
    toy = families.register(_toy_family())
    yield toy
    del FAMILIES['toy'], DELIVERIES['toy']


def test_a_new_family_is_one_entry(toy_family, tmp_path, tiny_cnn_file, tiny_vit_file, monkeypatch):
    """Registered in one place, a family is built for training, gets its preprocessing, is recognised from its
    keys, loads and predicts through `submit`, and is offered by `predict --model`, the ensemble and export, with
    no other module touched."""
    toy = toy_family
    assert isinstance(create_model(toy.recipe, pretrained=False), _Toy)
    assert training.preprocessing_for(toy.recipe, 24) == Preprocessing(24, 1.0, (0.5,) * 3, (0.5,) * 3)

    torch.manual_seed(0)
    path = tmp_path / 'toy_flowers.pth'
    torch.save(_Toy().state_dict(), path)
    path.with_suffix('.json').write_text(json.dumps({'family': 'toy'}))
    assert delivery_of(torch.load(path, weights_only=True)) == 'toy'
    for model in (submit.load_any_model(path), submit.loader_for('toy')(path)):
        assert model.flowers_family == 'toy' and model.flowers_preprocessing.size == 16
    photo = real_photos(1)['rose'][0]
    assert submit.predict(submit.load_any_model(path), photo) in CLASSES
    with pytest.raises(ValueError, match='it holds a toy linear model: load it with load_toy_model'):
        submit.load_cnn_model(path)

    assert 'toy' in predict.model_choices()
    assert predict.load_chosen_model('toy', str(path)).flowers_family == 'toy'
    monkeypatch.chdir(tmp_path)   # the toy's default file is found in the current directory
    assert predict.load_chosen_model('toy').flowers_family == 'toy'
    both = submit.load_ensemble(tiny_cnn_file, tiny_vit_file, toy_path=path)
    assert [m.flowers_family for m in both.members] == ['cnn', 'vit', 'toy']

    import export
    with pytest.raises(SystemExit, match='no finished run'):   # a choice of --family, not an argparse error
        export.main(['--family', 'toy', '--runs', str(tmp_path)])


def test_a_family_registered_twice_is_refused(toy_family):
    with pytest.raises(ValueError, match="named 'toy' already exists"):
        families.register(_toy_family())
    with pytest.raises(ValueError, match='give both one name'):
        families.register(dataclasses.replace(_toy_family(), name='toy2'))
    assert 'toy2' not in FAMILIES and 'toy2' not in delivery.DELIVERIES


def test_a_served_model_declares_how_to_feed_it_and_patched_attributes_are_not_enough(tiny_cnn_file):
    model = submit.load_cnn_model(tiny_cnn_file)
    assert isinstance(model, Served) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    patched = nn.Linear(3, len(CLASSES))   # what `submit` used to do to its networks: attributes set from outside
    patched.flowers_family, patched.flowers_preprocessing = 'cnn', model.flowers_preprocessing
    with pytest.raises(TypeError, match='expected a model returned by load_cnn_model'):
        submit.predict_proba(patched, real_photos(1)['rose'][0])
