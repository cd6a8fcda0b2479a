"""One spec for the upcycling knobs: `upcycle()`'s defaults, `hf-condcomp upcycle --help` and the
recipes' accepted `upcycling:` keys all come from `hf_condcomp.spec.UpcycleSpec`."""

import argparse
import dataclasses
import inspect

import pytest

import hf_condcomp
from hf_condcomp import training
from hf_condcomp.cli import build_parser
from hf_condcomp.modeling.configuration_condcomp import CondCompFields
from hf_condcomp.spec import SPEC_FIELDS, UpcycleSpec


def spec_defaults():
    return {f.name: f.default for f in dataclasses.fields(UpcycleSpec)}


def upcycle_subparser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["upcycle"]


def test_upcycle_signature_is_the_spec():
    params = inspect.signature(hf_condcomp.upcycle).parameters
    given = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert given == spec_defaults()
    assert list(params)[0] == "source" and list(params)[-1] == "config_overrides"


def test_cli_flags_and_defaults_are_the_spec():
    actions = {a.dest: a for a in upcycle_subparser()._actions}
    flags = {dest: a.default for dest, a in actions.items() if dest not in ("help", "overwrite", "overrides",
                                                                            "source", "output_dir", "json", "dtype")}
    assert flags == spec_defaults()
    for name, f in SPEC_FIELDS.items():
        assert f.metadata["help"] in actions[name].help
        assert actions[name].option_strings == [f"--{name.replace('_', '-')}"]


def test_recipe_keys_are_the_spec_less_what_the_recipe_sets():
    assert set(training.UPCYCLING_KEYS) == set(SPEC_FIELDS) - {"task", "num_labels"}


def test_config_field_knobs_default_to_the_config_defaults():
    config_defaults = {f.name: f.default for f in dataclasses.fields(CondCompFields)}
    knobs = [f for f in dataclasses.fields(UpcycleSpec) if f.metadata.get("config_field")]
    assert knobs
    for f in knobs:
        assert f.default == config_defaults[f.name], f.name


def test_cli_reads_values_as_the_recipes_do(tmp_path):
    args = upcycle_subparser().parse_args(["src", str(tmp_path), "--layers", "0,2", "--capacity-factor", "1.5",
                                           "--gate-straight-through", "false", "--mod-layers", "all"])
    assert args.layers == "0,2" and args.capacity_factor == 1.5 and args.gate_straight_through is False
    assert args.mod_layers == "all"


@pytest.mark.parametrize("kwargs,field", [
    (dict(variant="moed"), "`variant`"), (dict(num_experts=8, top_k=9), "`top_k`"), (dict(init="clone"), "`init`"),
    (dict(routing="random"), "`routing`"), (dict(capacity_factor=0), "`capacity_factor`"),
])
def test_the_spec_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UpcycleSpec(**kwargs)


def test_top_k_zero_names_the_default_number_of_experts():
    with pytest.raises(ValueError) as err:
        UpcycleSpec(top_k=0)
    assert "None" not in str(err.value) and "8 from one source" in str(err.value) and "got 0" in str(err.value)


def test_cli_upcycle_prints_a_summary_and_the_record_with_json(tmp_path, capsys):
    import json

    from hf_condcomp.cli import main as cli_main

    from conftest import tiny_source

    tiny_source("llama").save_pretrained(tmp_path / "dense")
    capsys.readouterr()  # what saving the source printed (DeepSpeed's first log line, where it is installed)
    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "a"), "--num-experts", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "MoE, 4 experts, top-2" in lines[1]
    folder = str(tmp_path / "a")
    assert lines[2] == f"load with: AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True)"
    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "b"), "--num-experts", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["architecture"] == "CondCompForCausalLM" and record["upcycling"]["num_experts"] == 4


def test_cli_stdout_carries_the_result_only(tmp_path, capsys, monkeypatch):
    """A library that prints to stdout while a command runs (DeepSpeed's logger does, from the first
    save_pretrained, wherever it is installed: its handler may predate the command) prints to stderr:
    `--json` output still parses."""
    import json
    import sys

    from hf_condcomp.cli import main as cli_main

    from conftest import tiny_source

    module = sys.modules["hf_condcomp.upcycle"]  # the package's `upcycle` is the function
    real_upcycle = module.upcycle

    def chatty_upcycle(*args, **kwargs):
        print("[WARNING] Setting accelerator to CPU.")  # what DeepSpeed prints on a machine without a GPU
        return real_upcycle(*args, **kwargs)

    monkeypatch.setattr(module, "upcycle", chatty_upcycle)
    tiny_source("llama").save_pretrained(tmp_path / "dense")
    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "a"), "--num-experts", "4", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["upcycling"]["num_experts"] == 4
    assert "Setting accelerator to CPU" in out.err
