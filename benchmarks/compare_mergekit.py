"""`hf-condcomp merge` + `hf-condcomp export` against real mergekit-moe on the same YAML.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit
    python benchmarks/compare_mergekit.py --mergekit-moe /tmp/mk/bin/mergekit-moe

mergekit is not a dependency: it runs from its own environment, as a command. This script saves a
tiny random Llama base and two fine-tunes of it (every weight changed, each differently) with a
word-level tokenizer, writes one mergekit-moe YAML per case (`gate_mode` hidden, hidden_avg and
cheap_embed; a tokenizer that adds BOS itself, as Llama's does, and one that does not, as GPT-2's
and SmolLM2's; prompts of unequal length, and for hidden_avg also of equal length, so that no
prompt is padded; `dtype: float32`, 2 experts per token), runs
`mergekit-moe` and `hf-condcomp merge` + `export` on it, loads both Mixtral folders with
transformers and compares every weight: the experts (`w1`/`w2`/`w3` or fused `gate_up_proj` /
`down_proj`), the shared weights (attention, norms, embeddings, head) and the router `gate` rows
(max absolute difference and cosine per row). The JSON goes to benchmarks/results/compare_mergekit.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hf_condcomp.cli import main as cli_main  # noqa: E402

from common import machine_info  # noqa: E402

WORDS = ("hello how are you today fine thanks what about your weekend a man woman dog runs in the park on "
         "beach red shirt ball water two young old sits near street now").split()
PROMPTS = {  # "unequal": prompts of different lengths, so that each batch has padding
    "unequal": [["hello how are you today", "what about your weekend", "fine thanks"],
                ["a man runs in the park on the beach near the water", "two young dog",
                 "an old woman sits near the street"]],
    "equal": [["hello how are you today", "what about your weekend now"],  # 5 words each: no padding
              ["a man runs in the", "an old woman sits near"]],
}
CASES = [(mode, bos, "unequal") for bos in (True, False) for mode in ("hidden", "hidden_avg", "cheap_embed")] + [
    ("hidden_avg", True, "equal")]


def tokenizer(adds_bos):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", *sorted(set(WORDS) | {"an"})])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:  # as Llama's tokenizer: BOS before every text
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_models(folder, tok, seed=0):
    """A random tiny Llama base and two fine-tunes (each weight moved by 10% of its std, by source)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    paths = {}
    for name in ("base", "expert_a", "expert_b"):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(base.state_dict())
        if name != "base":
            g = torch.Generator().manual_seed(len(paths))  # 1 for expert_a, 2 for expert_b
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.std() if p.numel() > 1 else 1.0))
        paths[name] = folder / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def write_yaml(path, paths, gate_mode, prompts):
    config = {"base_model": str(paths["base"]), "gate_mode": gate_mode, "dtype": "float32",
              "experts_per_token": 2,
              "experts": [{"source_model": str(paths[name]), "positive_prompts": prompts}
                          for name, prompts in zip(("expert_a", "expert_b"), PROMPTS[prompts])]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def mixtral_state(folder):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.float() for k, v in model.state_dict().items()}


def compare(ours, theirs):
    """Per weight group: max |difference|; per router: cosine of each row with mergekit's."""
    groups = {"experts": {}, "shared": {}, "gate": {}}
    missing = sorted(set(ours) ^ set(theirs))
    cosines = {}
    for key in sorted(set(ours) & set(theirs)):
        group = "gate" if key.endswith("mlp.gate.weight") else "experts" if ".experts." in key else "shared"
        a, b = ours[key], theirs[key]
        if a.shape != b.shape:
            groups[group][key] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
            continue
        groups[group][key] = (a - b).abs().max().item()
        if group == "gate":
            cosines[key] = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    summary = {g: max((v for v in d.values() if isinstance(v, float)), default=None) for g, d in groups.items()}
    return {"max_abs_difference": summary, "per_weight": groups, "gate_row_cosine": cosines,
            "keys_only_on_one_side": missing}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit-moe", default="/tmp/mk/bin/mergekit-moe", help="the mergekit-moe command")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "compare_mergekit.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    version = subprocess.run([str(Path(args.mergekit_moe).parent / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), "
                              "m.version('transformers'))"], capture_output=True, text=True).stdout.split()
    record = {"command": " ".join(["python", "benchmarks/compare_mergekit.py", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
              "machine": machine_info(), "mergekit": dict(zip(("mergekit", "torch", "transformers"), version)),
              "prompts": PROMPTS, "cases": []}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for adds_bos in (True, False):
            tok = tokenizer(adds_bos)
            paths = save_models(tmp / f"bos{int(adds_bos)}", tok)
            for mode, bos, prompts in CASES:
                if bos != adds_bos:
                    continue
                case = tmp / f"{mode}_bos{int(bos)}_{prompts}"
                case.mkdir()
                write_yaml(case / "moe.yml", paths, mode, prompts)
                done = subprocess.run([args.mergekit_moe, str(case / "moe.yml"), str(case / "mergekit"),
                                       "--device", "cpu", "--quiet"], capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                if done.returncode:
                    sys.exit(f"mergekit-moe failed on {mode}:\n{done.stderr[-3000:]}")
                assert cli_main(["merge", str(case / "moe.yml"), str(case / "ours")]) == 0
                assert cli_main(["export", str(case / "ours"), str(case / "ours_mixtral")]) == 0
                result = compare(mixtral_state(case / "ours_mixtral"), mixtral_state(case / "mergekit"))
                result.update(gate_mode=mode, tokenizer_adds_bos=bos, prompts=prompts)
                record["cases"].append(result)
                print(f"gate_mode {mode:11s} tokenizer adds BOS {bos!s:5s} prompts {prompts:7s}: max |diff| "
                      + ", ".join(f"{g} {v:.2e}" if v is not None else f"{g} n/a"
                                  for g, v in result["max_abs_difference"].items())
                      + f"; gate row cosine min {min(min(c) for c in result['gate_row_cosine'].values()):.6f}",
                      flush=True)
    record["wall_seconds"] = round(time.time() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
