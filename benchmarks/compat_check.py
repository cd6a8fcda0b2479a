"""Load saved models through remote code and compare them with the outputs recorded at save time.

Runs inside one of `compat.py`'s virtual environments, where transformers is the release under
test and `hf_condcomp` is not installed: it imports only torch and transformers, and blocks
`hf_condcomp` so that a stray copy on the path cannot serve the classes. Prints one JSON object:
{"transformers": version, "torch": version, "cases": {name: {"ok": bool, ...}}}.

    python benchmarks/compat_check.py MODELS_DIR [--case NAME ...]
"""

import sys

sys.modules["hf_condcomp"] = None  # `import hf_condcomp` raises ImportError from here on

import argparse  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

TOLERANCE = 1e-4


def cache_of(output):
    """The cache an output carries: `cache` from transformers 5.24 on, `past_key_values` before."""
    fields = output.keys()
    return output["cache"] if "cache" in fields else output["past_key_values"]


def check_case(folder: Path) -> dict:
    ref = torch.load(folder / "reference.pt")
    auto = getattr(transformers, ref["auto"])
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    result = {"module": type(model).__module__}
    assert type(model).__module__.startswith("transformers_modules"), (
        f"loaded {type(model).__module__}, not remote code")
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    result["logits_max_abs_diff"] = float((out.logits - ref["logits"]).abs().max())

    # The training forward: loss (task + router / gate losses) and a backward pass.
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ref["labels"])
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    model.eval()
    result["train_loss_abs_diff"] = abs(float(out.loss) - ref["train_loss"])
    result["grads_finite"] = bool(grads_finite)
    drift = 0.0
    if (folder / "dense").is_dir():  # a native model: how much this release's own source model moved
        dense = auto.from_pretrained(folder / "dense").eval()
        with torch.no_grad():
            drift = float((dense(input_ids=ids, attention_mask=mask).logits - ref["dense_logits"]).abs().max())
        result["source_logits_drift"] = drift
    # The upcycled model must move no more than its dense source does on this release.
    checks = [result["logits_max_abs_diff"] <= TOLERANCE + drift,
              drift > TOLERANCE or result["train_loss_abs_diff"] <= TOLERANCE, grads_finite]
    if ref["auto"] != "AutoModel" and model.config.model_type == "condcomp":
        # a native task model loads as AutoModel too: the same base model, its head left out
        base = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        inner = model.base_model
        with torch.no_grad():
            expected = inner(input_ids=ids, attention_mask=mask).last_hidden_state
            got = base(input_ids=ids, attention_mask=mask).last_hidden_state
        result["as_auto_model_max_abs_diff"] = float((got - expected).abs().max())
        checks.append(result["as_auto_model_max_abs_diff"] <= TOLERANCE)

    if "greedy" in ref:
        gen = dict(max_new_tokens=ref["greedy"].shape[1] - ref["prompt"].shape[1], do_sample=False, pad_token_id=0)
        prompt, prompt_mask = ref["prompt"], ref["prompt_mask"]
        cached = model.generate(prompt, attention_mask=prompt_mask, use_cache=True, **gen)
        uncached = model.generate(prompt, attention_mask=prompt_mask, use_cache=False, **gen)
        result["greedy_with_cache_equal"] = torch.equal(cached, ref["greedy"])
        result["greedy_without_cache_equal"] = torch.equal(uncached, ref["greedy"])
        checks += [result["greedy_with_cache_equal"], result["greedy_without_cache_equal"]]
        if not (getattr(model.config, "mod_layers", None) or getattr(model.config, "gate_layers", None)):
            # MoE routing changes no token set: a static cache gives the same tokens
            static = model.generate(prompt, attention_mask=prompt_mask, cache_implementation="static", **gen)
            result["greedy_static_cache_equal"] = torch.equal(static, ref["greedy"])
            checks.append(result["greedy_static_cache_equal"])

        # A cache handed back under either keyword: what this release's generate() passes and
        # what the other convention passes. The next token's logits must equal a full forward.
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        nxt = ref["greedy"][:2, -1:]
        with torch.no_grad():
            full = model(input_ids=torch.cat([ids, nxt], dim=1), attention_mask=full_mask, use_cache=False).logits
            for keyword in ("past_key_values", "cache"):
                cache = cache_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
                step = model(input_ids=nxt, attention_mask=full_mask, use_cache=True, **{keyword: cache}).logits
                diff = float((step[:, -1] - full[:, -1]).abs().max())
                result[f"step_via_{keyword}_max_abs_diff"] = diff
                checks.append(diff <= TOLERANCE)
    result["ok"] = bool(all(checks))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models_dir", type=Path)
    p.add_argument("--case", action="append", default=None, help="only these cases (default: every folder)")
    args = p.parse_args()
    torch.manual_seed(0)
    names = args.case or sorted(d.name for d in args.models_dir.iterdir() if (d / "reference.pt").exists())
    cases = {}
    for name in names:
        try:
            cases[name] = check_case(args.models_dir / name)
        except Exception as err:  # one broken case must not hide the others
            cases[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500],
                           "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
