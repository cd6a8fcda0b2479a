"""`hf-condcomp` command line: upcycle checkpoints and check the result."""

import argparse
import json
import sys
from pathlib import Path

from .console import emit, results_on_stdout_only
from .saving import DTYPES, save_atomically, save_with_tokenizer
from .yaml_values import yaml_value

DEMO_SOURCE = "all-MiniLM-L6-v2"
DEMO_TEXTS = [
    "Conditional computation spends capacity only where a token needs it.",
    "The cat sat on the mat.",
    "How do I transfer money to another account?",
]


# Packages that define gated variants name the modules that register them under this entry-point group
# (pyproject.toml: [project.entry-points."hf_condcomp.gated_variants"] my_gate = "my_package.my_gate"),
# so that `hf-condcomp upcycle` knows their `--variant` and flags.
VARIANT_ENTRY_POINTS = "hf_condcomp.gated_variants"


def load_variant_plugins():
    """Import every module named under `VARIANT_ENTRY_POINTS`: importing a variant's module registers it."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=VARIANT_ENTRY_POINTS):
        entry.load()


def add_upcycle_arguments(p: argparse.ArgumentParser):
    """One flag per field of `UpcycleSpec`, with its default and help: `--num-experts`, ...; the settings of
    every registered gated variant too (`--capacity`, and those of a variant registered from outside)."""
    from .spec import spec_fields

    for name, f in spec_fields().items():
        meta = f.metadata
        kind = f.type if f.type in (int, float) else yaml_value  # read as the recipes read `key=value`
        help_text = meta["help"] + (f" (one of {', '.join(meta['choices'])})" if meta["choices"] else "")
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=f.default,
                       help=f"{help_text}; default: {f.default}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="any other config field, repeatable: --set mod_aux_loss_coef=0.1")


def parse_overrides(items) -> dict:
    """`FIELD=VALUE` strings from `--set`, values read as the recipes read `key=value` overrides."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"`--set` takes FIELD=VALUE, got {item!r}: e.g. --set mod_aux_loss_coef=0.1.")
        out[name.strip()] = yaml_value(value)
    return out


def upcycle_kwargs(args) -> dict:
    from .spec import spec_fields

    kwargs = {name: getattr(args, name) for name in spec_fields()}
    for name, value in parse_overrides(args.overrides).items():
        if name in kwargs:
            raise ValueError(f"`--set {name}={value}`: `{name}` has its own flag, use --{name.replace('_', '-')}.")
        kwargs[name] = value
    return kwargs


def _upcycle_and_save(sources, settings, output_dir, overwrite, dtype=None, as_json=False, read=()):
    """Upcycle one source (or several, as experts) and save it with the tokenizer of the base, else
    of the first source, and its model card, which lists the files in `read` ((path, what))."""
    from .saving import check_output_dir
    from .upcycle import upcycle

    check_output_dir(output_dir, overwrite)  # refuse before the sources are read
    model = upcycle(sources if len(sources) > 1 else sources[0], **settings)
    model._model_card.name = Path(output_dir).name  # saved to a temporary folder first
    for path, what in read:
        model._model_card.add_file(path, what)
    if dtype is not None:
        import torch

        model.to(getattr(torch, dtype))
    tokenizer_source = settings.get("tokenizer") or settings.get("base") or sources[0]
    save_atomically(Path(output_dir), lambda tmp: save_with_tokenizer(model, tokenizer_source, tmp), overwrite)
    if as_json:
        emit(json.dumps({"output_dir": str(output_dir), "architecture": type(model).__name__,
                          "upcycling": model.config.upcycling}, indent=2))
    else:
        emit(upcycle_summary(model, output_dir))


def upcycle_summary(model, output_dir) -> str:
    """A few lines: what was made, from what, and how to load it (`--json`: the whole record)."""
    record = model.config.upcycling
    sources = record.get("expert_sources") or [record.get("source")]
    if record["variant"] == "moe":
        what = (f"MoE, {record['num_experts']} experts, top-{record['top_k']}, {record['routing']}, "
                f"init {record['init']}")
    else:
        what = record["variant"]
    auto = type(model)._auto_class_of_task.__name__
    return "\n".join([
        f"upcycled : {', '.join(map(str, sources))} ({record['source_model_type']}) -> {output_dir}",
        f"variant  : {what}; layers {record['layers']}",
        f"load with: {auto}.from_pretrained({str(output_dir)!r}, trust_remote_code=True)",
    ])


def cmd_upcycle(args):
    _upcycle_and_save(args.source, upcycle_kwargs(args), args.output_dir, args.overwrite, args.dtype, args.json)


def cmd_merge(args):
    """A mergekit-moe YAML: its fine-tunes as the experts of every layer (merge_config.py)."""
    from .merge_config import read_merge_config

    sources, settings, dtype = read_merge_config(args.config)
    _upcycle_and_save(sources, {**settings, "seed": args.seed}, args.output_dir, args.overwrite, dtype, args.json,
                      read=[(args.config, "mergekit-moe config")])


def cmd_export(args):
    from .export import export_native

    emit(json.dumps(export_native(args.model_dir, args.output_dir, args.format, args.overwrite), indent=2))


def cmd_demo(args):
    """The main job on the embedded default: upcycle the real all-MiniLM-L6-v2 into an MoE, check
    it reproduces its dense parent, save it, reload it through the Auto classes, show routing."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from . import assets
    from .upcycle import upcycle

    path = assets.resolve(DEMO_SOURCE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    moe = upcycle(DEMO_SOURCE, num_experts=args.num_experts, top_k=args.top_k)
    batch = tokenizer(DEMO_TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = dense(**batch).last_hidden_state
        out = moe(**batch, output_router_logits=True)
    diff = (ref - out.last_hidden_state)[mask].abs().max().item()
    output_dir = Path(args.output_dir)
    moe._model_card.name = output_dir.name  # saved to a temporary folder first
    save_atomically(output_dir, lambda tmp: save_with_tokenizer(moe, DEMO_SOURCE, tmp), overwrite=True)
    reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        again = reloaded(**batch).last_hidden_state
    reload_diff = (again - out.last_hidden_state).abs().max().item()
    dense_params = sum(p.numel() for p in dense.parameters())
    moe_params = sum(p.numel() for p in moe.parameters())
    emit(f"source              : {DEMO_SOURCE} ({path})")
    emit(f"MoE layers          : {moe.config.moe_layers}, {moe.config.num_local_experts} experts, "
          f"top-{moe.config.num_experts_per_tok}")
    emit(f"parameters          : dense {dense_params / 1e6:.1f}M -> upcycled {moe_params / 1e6:.1f}M")
    emit(f"max |MoE - dense|   : {diff:.2e} (copy-upcycling starts at the dense model)")
    emit(f"saved to            : {output_dir} (reloaded with trust_remote_code, max diff {reload_diff:.1e})")
    valid = mask.reshape(-1)
    for layer, logits in zip(moe.config.moe_layers, out.router_logits):
        top = logits[valid].topk(moe.config.num_experts_per_tok, dim=-1).indices.reshape(-1)
        counts = torch.bincount(top, minlength=moe.config.num_local_experts).tolist()
        emit(f"layer {layer} tokens/expert: {counts}")
    if diff > 1e-4 or reload_diff > 1e-5:
        print("FAILED: the upcycled model does not reproduce its parent", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .modeling.configuration_condcomp import DEFAULT_NUM_EXPERTS, DEFAULT_TOP_K

    load_variant_plugins()
    parser = argparse.ArgumentParser(prog="hf-condcomp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("upcycle", help="upcycle a dense checkpoint into a conditional-computation model")
    p.add_argument("source", nargs="+", metavar="SOURCE",
                   help="Hub id, local folder, or embedded name (all-MiniLM-L6-v2, SmolLM2-135M-Instruct); several: "
                        "dense fine-tunes of one model, which become the experts of each MoE layer")
    p.add_argument("output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument("--json", action="store_true", help="print the whole upcycling record as JSON, not a summary")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the dtype the model is saved in (as mergekit's `dtype`); default: the source's")
    add_upcycle_arguments(p)
    p.set_defaults(func=cmd_upcycle)
    p = sub.add_parser("merge", help="a mergekit-moe YAML: several fine-tunes into one MoE (export: the native class)")
    p.add_argument("config", help="mergekit-moe YAML (base_model, gate_mode, dtype, experts_per_token, experts)")
    p.add_argument("output_dir")
    p.add_argument("--seed", type=int, default=0, help="seeds random routers; default: 0")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.add_argument("--json", action="store_true", help="print the whole upcycling record as JSON, not a summary")
    p.set_defaults(func=cmd_merge)
    from .export import export_format_choices

    p = sub.add_parser("export",
                       help="write an upcycled Llama-family or T5 MoE in a native transformers MoE architecture")
    p.add_argument("model_dir", help="a folder saved by hf-condcomp upcycle or a recipe")
    p.add_argument("output_dir")
    p.add_argument("--format", default="auto", choices=export_format_choices(),
                   help="auto: the first registered format that expresses the model: qwen3_moe for a Qwen3 source, "
                        "else mixtral when every layer is MoE, else qwen2_moe (dense layers as mlp_only_layers); "
                        "switch_transformers for T5, nllb_moe for M2M100 / NLLB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("demo", help="upcycle the embedded all-MiniLM-L6-v2 and check it against its parent")
    p.add_argument("--output-dir", default="outputs/all-MiniLM-L6-v2-moe")
    p.add_argument("--num-experts", type=int, default=DEFAULT_NUM_EXPERTS)
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.set_defaults(func=cmd_demo)
    from .insight import add_inspect_parsers

    add_inspect_parsers(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with results_on_stdout_only():
            return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"hf-condcomp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
