"""Config validation of segnn_jax.training.config: every error names its option."""

import ml_collections
import pytest

from segnn_jax.training import (ConfigError, check_budgets, check_known_options,
                                default_train_config, validate_train_config)


def test_defaults_validate_and_configdict_is_accepted():
    config = ml_collections.ConfigDict(default_train_config())
    config.optimizer.learning_rate = 1e-3
    full = validate_train_config(config)
    assert full["optimizer"]["learning_rate"] == 1e-3 and full["num_epochs"] == 10


@pytest.mark.parametrize("section, message", [
    ({"optimizer": {"learning_rate": -1e-3}}, r"config\.train\.optimizer\.learning_rate: must be > 0"),
    ({"optimizer": {"weight_decay": -1.0}}, r"config\.train\.optimizer\.weight_decay: must be >= 0"),
    ({"optimizer": {"optimizer": "sgd"}}, r"config\.train\.optimizer\.optimizer: expected 'adam'"),
    ({"optimizer": {"decay_fractions": [1.5]}}, r"decay_fractions: entries must be in \(0, 1\]"),
    ({"num_epochs": 2.5}, r"config\.train\.num_epochs: expected an integer"),
    ({"num_epochs": "ten"}, r"config\.train\.num_epochs: expected a finite number"),
    ({"ema_decay": 1.0}, r"config\.train\.ema_decay: must be in \[0, 1\)"),
    ({"best_mode": "lowest"}, r"config\.train\.best_mode"),
    ({"keep_checkpoints": 0}, r"config\.train\.keep_checkpoints: must be > 0"),
    ({"time_budget_s": 0}, r"config\.train\.time_budget_s: must be > 0"),
    ({"time_budget_s": float("nan")}, r"config\.train\.time_budget_s: expected a finite number"),
    ({"compiler_options": {"use_fusion_emitters": False}},
     r"config\.train\.compiler_options: 'use_fusion_emitters': XLA option names start with 'xla_'"),
    ({"compiler_options": {"xla_cpu_use_fusion_emitter": False}},
     r"config\.train\.compiler_options: xla_cpu_use_fusion_emitter=False: XLA refuses it"),
    ({"compiler_options": {"xla_cpu_use_fusion_emitters": "sometimes"}},
     r"config\.train\.compiler_options: xla_cpu_use_fusion_emitters='sometimes': XLA refuses it"),
])
def test_invalid_values_name_the_option(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(section)


def test_compiler_options_take_any_xla_option():
    """The section's keys are XLA's option names, not a fixed list: any option XLA accepts."""
    config = ml_collections.ConfigDict(default_train_config())
    config.compiler_options = {"xla_cpu_use_fusion_emitters": False}
    full = validate_train_config(config)
    assert full["compiler_options"] == {"xla_cpu_use_fusion_emitters": False}
    assert validate_train_config({})["compiler_options"] == {}
    check_known_options({"compiler_options": {"xla_cpu_use_fusion_emitters": True}},
                        default_train_config())


def test_unknown_option_at_any_depth():
    reference = {"train": default_train_config(), "batch": {"batch_size": 128, "max_nodes": None}}
    with pytest.raises(ConfigError, match=r"config\.batch\.batch_sise: unknown option; did you mean "
                                          r"config\.batch\.batch_size\?"):
        check_known_options({"batch": {"batch_sise": 3}}, reference)
    with pytest.raises(ConfigError, match=r"config\.model: unknown option"):
        check_known_options({"model": {}}, reference)
    check_known_options({"batch": {"batch_size": 3}}, reference)


def test_budgets_negative_batch_size_and_largest_graph():
    with pytest.raises(ConfigError, match=r"config\.batch\.batch_size: must be a positive integer, got -4"):
        check_budgets({"batch_size": -4}, {})
    with pytest.raises(ConfigError, match=r"config\.batch\.max_nodes=20 is smaller than the largest "
                                          r"graph of the dataset \(29\); raise it to at least 29"):
        check_budgets({"max_nodes": 20, "max_edges": 1000}, {"max_nodes": 29, "max_edges": 400})
    with pytest.raises(ConfigError, match=r"max_nodes=29 .* \(29 plus 1 for padding\)"):
        check_budgets({"max_nodes": 29}, {"max_nodes": 29}, padding={"max_nodes": 1})
    check_budgets({"max_nodes": 30, "max_edges": None}, {"max_nodes": 29, "max_edges": 400},
                  padding={"max_nodes": 1})
