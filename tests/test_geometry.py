from types import SimpleNamespace

import pytest

from safetylock.geometry import GeometryError, head_geometry, output_projections
from safetylock.hf import load_model


def test_gqa_and_explicit_head_dim():
    cfg = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=192, head_dim=64)
    geo = head_geometry(cfg)
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim) == (3, 4, 2, 64)
    assert geo.o_proj_in_features == 256


def test_head_dim_defaults_to_hidden_over_heads_and_kv_to_heads():
    geo = head_geometry(SimpleNamespace(num_hidden_layers=2, num_attention_heads=8, hidden_size=512))
    assert geo.head_dim == 64 and geo.num_kv_heads == 8


def test_multimodal_config_uses_text_config():
    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, hidden_size=128, num_key_value_heads=1)
    outer = SimpleNamespace(get_text_config=lambda: text)
    assert head_geometry(outer).num_kv_heads == 1


def test_missing_fields_and_bad_gqa_are_refused():
    with pytest.raises(GeometryError, match="no attention geometry"):
        head_geometry(SimpleNamespace(hidden_size=4))
    with pytest.raises(GeometryError, match="invalid attention geometry"):
        head_geometry(SimpleNamespace(num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=2, hidden_size=192))


def test_output_projections_match_config(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    geo = head_geometry(model.config)
    projections = output_projections(model, geo)
    assert len(projections) == geo.num_layers == 3
    assert all(p.in_features == geo.num_heads * geo.head_dim for p in projections)
    assert all(p.out_features == geo.hidden_size for p in projections)
