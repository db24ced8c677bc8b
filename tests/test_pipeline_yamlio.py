"""Config YAML is parsed with a bound on aliases (``pipeline.yamlio.load_yaml``)."""

import pytest
import yaml

from pipeline.yamlio import MAX_ALIASES, TooManyAliasesError, load_yaml


def test_plain_yaml_and_a_few_aliases_load_as_safe_load_does():
    text = "base: &b {lr: 0.001, epochs: 2}\nstages:\n  - *b\n  - {<<: *b, lr: 0.0001}\n"
    assert load_yaml(text) == yaml.safe_load(text)
    assert load_yaml("") is None


def test_more_aliases_than_the_bound_are_refused():
    ok = "a: &a 1\nb: [" + ", ".join(["*a"] * MAX_ALIASES) + "]\n"
    assert len(load_yaml(ok)["b"]) == MAX_ALIASES
    with pytest.raises(TooManyAliasesError, match=f"more than {MAX_ALIASES} aliases"):
        load_yaml("a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n")


def test_python_tags_stay_refused():
    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']\n")
