"""Values written on a command line as YAML reads them: the recipes' `key=value` overrides and the
flags of `hf-condcomp upcycle` read `2`, `0.5`, `true`, `null` and `[1, 3]` alike."""

import yaml


def yaml_value(text):
    """A command-line value read as YAML (true, 2, 0.5, [1, 3]); text that is no YAML stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
