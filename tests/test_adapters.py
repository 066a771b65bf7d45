"""trmlx.adapters: the one rule for which linears `peft.targets` names and which blocks `peft.layers` selects, used
the same way by both backends and the planners (a string target and its one-element list name the same layers)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from trmlx.adapters import is_target, layer_indices, match_targets, peft_target_modules
from trmlx.errors import UserError
from trmlx.recipe import load_recipe

T5_BLOCK = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.o", "layer.1.EncDecAttention.o",
            "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wo"]
LLAMA = REPO / "recipes" / "models" / "tiny-llama-tr"
SEQ2SEQ = REPO / "recipes" / "seq2seq_quickstart.toml"


def test_a_target_names_a_path_or_its_dotted_suffix_never_a_substring():
    assert match_targets(T5_BLOCK, "wo") == match_targets(T5_BLOCK, ["wo"]) == ["layer.2.DenseReluDense.wo"]
    assert match_targets(T5_BLOCK, "o") == ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"]
    assert match_targets(T5_BLOCK, ["EncDecAttention.o", "q"]) == ["layer.0.SelfAttention.q",
                                                                  "layer.1.EncDecAttention.o"]
    assert match_targets(T5_BLOCK, "all-linear") == sorted(T5_BLOCK)
    assert not is_target("layer.2.DenseReluDense.wo", "w") and is_target("layer.2.DenseReluDense.wo", "all-linear")
    assert peft_target_modules(T5_BLOCK, "wo") == ["wo"]
    assert peft_target_modules(T5_BLOCK, "all-linear") == ["o", "q", "wi_0", "wo"]


def test_unknown_targets_and_too_many_layers_are_clear_errors():
    with pytest.raises(UserError) as err:
        match_targets(T5_BLOCK, ["wo", "wi"])
    assert err.value.problems == ["peft.targets: 'wi' matches no linear layer of this model; its linear layers are "
                                  "o, q, wi_0, wo"]
    assert layer_indices(4, 0) == [0, 1, 2, 3] and layer_indices(4, 2) == [2, 3]
    with pytest.raises(UserError, match="requested to adapt 5 layers but the model only has 4"):
        layer_indices(4, 5)


@pytest.mark.parametrize("targets", ['"wo"', '["wo"]'])
def test_the_seq2seq_planner_counts_what_a_string_names(targets):
    from trmlx.plan.seq2seq import adapted
    from trmlx.plan.tasks import load_shape

    recipe = load_recipe(SEQ2SEQ, [f"peft.targets={targets}"])
    shape = load_shape(recipe)
    params, _, _ = adapted(recipe, shape)
    d, ff, rank = shape.d_model, shape.d_ff, recipe.peft.rank
    assert params == rank * (ff + d) * (shape.encoder_layers + shape.decoder_layers)  # one wo per block


def test_both_backends_and_the_planner_adapt_the_same_layers_for_a_string_and_a_list():
    mlx_adapters = pytest.importorskip("trmlx.backends.mlx.adapters")
    pytest.importorskip("torch")
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM

    from trmlx.backends.cuda.model import target_names
    from trmlx.plan.causal import target_names as planned
    from trmlx.plan.tasks import load_shape

    mlx_model, _ = load_model(LLAMA)
    torch_model = AutoModelForCausalLM.from_pretrained(str(LLAMA))
    shape = load_shape(load_recipe(REPO / "recipes" / "quickstart.toml"))
    for one, listed in (("q_proj", ["q_proj"]), ("mlp.down_proj", ["mlp.down_proj"])):
        paths = mlx_adapters.target_keys(mlx_model, one)
        assert paths == mlx_adapters.target_keys(mlx_model, listed) == planned(shape, one) == planned(shape, listed)
        assert len(paths) == 1 and paths[0].endswith(one)
        assert target_names(torch_model, one) == target_names(torch_model, listed) == [one]
