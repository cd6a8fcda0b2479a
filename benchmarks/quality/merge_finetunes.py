"""Several fine-tunes merged into one MoE, measured: two dense fine-tunes of one base on two domains
become the two experts of each MoE layer (`upcycle([ft_a, ft_b], base=base, router_init=...)`),
against each fine-tune alone and against the copy-upcycle of one fine-tune given the same joint
fine-tune.

    python benchmarks/quality/merge_finetunes.py --threads 1             # SmolLM2-135M, RESULTS.md
    python benchmarks/quality/merge_finetunes.py --quick                 # the same, a few steps
    python benchmarks/quality/merge_finetunes.py --tiny --quick          # random tiny Llama, made-up text

Steps:
1. Fine-tune the base (all weights, causal LM) on domain A (chitchat conversations, the PyPI
   `chitchat_dataset`) and on domain B (Multi30k image captions, English or German side, from
   ../shared/data): the same steps, batch, learning rate and seed.
2. Merge: the fine-tunes' FFNs are the experts, the base holds the shared weights, the routers
   start from a few training texts of each domain (`--router-init`, positive prompts only).
3. Report, on held-out texts of both domains: the share of tokens each MoE layer sends to each
   expert (before any training, and after); the evaluation loss (mean over real next tokens) of
   the base, each fine-tune, the merged model at step 0 (also with the sources' average as shared
   weights), and the merged model and the copy-upcycle of fine-tune A (`upcycle(ft_a,
   num_experts=2)`) after the same joint fine-tune on a mix of both domains (same steps, batches
   and seed; load-balancing loss at the config's `router_aux_loss_coef`; routers at
   `--router-lr`, default the model's learning rate as in the recipes).

`--tiny` swaps in a randomly initialised 4-layer Llama, a word-level tokenizer and two made-up
word-list domains, so that the whole pipeline runs in seconds with no data or checkpoint.
The JSON (default benchmarks/quality/results/merge_finetunes.json; under /tmp with --quick or
--tiny) records the settings, the command, the commit, the machine and every number.
"""

import argparse
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from hf_condcomp import assets, upcycle  # noqa: E402
from hf_condcomp.insight import run_recorded  # noqa: E402
from hf_condcomp.training.models import make_optimizer  # noqa: E402

from common import machine_info  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "merge_finetunes.json"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--steps", type=int, default=40, help="optimizer steps of each domain fine-tune")
    a("--joint-steps", type=int, default=40, help="optimizer steps of each joint fine-tune (merged and control)")
    a("--batch", type=int, default=4, help="sequences per step (joint: half of each domain)")
    a("--max-length", type=int, default=64, help="tokens per sequence")
    a("--lr", type=float, default=5e-5, help="AdamW learning rate (all weights), linear decay after warmup")
    a("--router-lr", type=float, default=None, help="learning rate of the routers (default: --lr, as the recipes)")
    a("--warmup", type=int, default=4, help="warmup steps")
    a("--top-k", type=int, default=1, help="experts per token, of 2")
    a("--layers", default="all", help="MoE layers: all, every_other or indices")
    a("--router-init", default="hidden", choices=["hidden", "hidden_last", "cheap_embed", "random"])
    a("--num-prompts", type=int, default=8, help="training texts of each domain as its expert's prompts")
    a("--eval-texts", type=int, default=64, help="held-out texts per domain")
    a("--data", type=Path, default=ROOT.parent / "shared" / "data",
      help="the shared data folder (Multi30k under translation/multi30k)")
    a("--captions", default="en", choices=["en", "de"], help="domain B: Multi30k captions in this language")
    a("--captions-per-text", type=int, default=4, help="consecutive captions joined into one text")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a("--quick", action="store_true", help="smoke run: 3 steps each, 8 held-out texts per domain")
    a("--tiny", action="store_true", help="random tiny Llama and made-up texts: no data or checkpoint needed")
    a("--output", type=Path, default=None)
    return p


# ---------------------------------------------------------------- data


def chitchat_texts():
    """One text per conversation of the PyPI `chitchat_dataset`: its messages, one a line."""
    folder = assets._package_folder("chitchat_dataset")
    if folder is None:
        sys.exit("domain A needs the package: pip install --no-deps chitchat-dataset==0.9.0")
    raw = json.loads((folder / "dataset.json").read_text())
    texts = []
    for key in sorted(raw):  # sorted: the same order on every machine
        lines = [" ".join(m["text"].strip() for m in turn) for turn in raw[key]["messages"] if turn]
        if len(lines) >= 2:
            texts.append("\n".join(lines))
    return texts


def caption_texts(data, split, language, per_text):
    """Multi30k captions, `per_text` consecutive lines joined into one text."""
    lines = (data / "translation" / "multi30k" / f"{split}.{language}").read_text(encoding="utf-8").splitlines()
    lines = [line.strip() for line in lines if line.strip()]
    return ["\n".join(lines[i:i + per_text]) for i in range(0, len(lines) - per_text + 1, per_text)]


def real_domains(args, rng):
    """{name: (train texts, held-out texts)} and the domains' descriptions."""
    chat = chitchat_texts()
    rng.shuffle(chat)
    held = chat[:args.eval_texts]
    captions_train = caption_texts(args.data, "train", args.captions, args.captions_per_text)
    captions_val = caption_texts(args.data, "val", args.captions, args.captions_per_text)
    rng.shuffle(captions_train)
    rng.shuffle(captions_val)
    domains = {"chitchat": (chat[args.eval_texts:], held),
               f"captions_{args.captions}": (captions_train, captions_val[:args.eval_texts])}
    about = {"chitchat": "PyPI chitchat_dataset 0.9.0, one conversation per text, messages one a line",
             f"captions_{args.captions}": f"Multi30k {args.captions} captions (shared data, translation/multi30k), "
                                          f"{args.captions_per_text} consecutive captions per text; held out: val"}
    return domains, about


TINY_WORDS = {
    "talk": "hi hello how are you doing today i am fine thanks what about your weekend good great yes no "
            "really maybe love that movie sounds fun".split(),
    "scene": "a man woman dog child runs sits on the in street park beach grass red blue shirt ball water "
             "near two young old".split(),
}


def tiny_domains(args, rng):
    def texts(words, n):
        return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(n)]

    n_train = max(args.steps, args.joint_steps) * args.batch * 2 + args.num_prompts
    domains = {name: (texts(words, n_train), texts(words, args.eval_texts)) for name, words in TINY_WORDS.items()}
    return domains, {name: "made-up text from a word list of 20-odd words" for name in TINY_WORDS}


def tiny_model_and_tokenizer(seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *sorted({w for ws in TINY_WORDS.values()
                                                                             for w in ws})])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval(), tokenizer


def real_model_and_tokenizer():
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = assets.smollm2_path()
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def encode(tokenizer, texts, max_length):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def batches(tokenizer, texts, size, max_length):
    return [encode(tokenizer, texts[i:i + size], max_length) for i in range(0, len(texts), size)]


# ---------------------------------------------------------------- training and evaluation


def train(model, steps, batch_list, args):
    """Full fine-tuning, AdamW (routers at --router-lr), warmup then linear decay. The MoE heads add
    the load-balancing loss to `loss` in training mode. Returns the mean loss of the last 5 steps."""
    from transformers import get_scheduler

    opt_args = argparse.Namespace(learning_rate=args.lr, router_learning_rate=args.router_lr, weight_decay=0.0)
    optimizer = make_optimizer(model, opt_args)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=min(args.warmup, steps),
                              num_training_steps=steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = batch_list[step]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses[-5:]) / len(losses[-5:]) if losses else None


def _loss_sum(logits, batch):
    """(summed cross-entropy, count) over every real next token of a batch."""
    logits = logits[:, :-1].float()
    target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total.item(), int((target != -100).sum())


@torch.no_grad()
def evaluate_model(model, batch_list):
    """(mean loss over every real next token of the held-out texts, no router losses;
    {MoE layer: share of real tokens whose first-choice expert is each expert} or None for a dense
    model), from one pass over the texts (`run_recorded` reads the routers as the model runs)."""
    model.eval()
    total, count = 0.0, 0
    if not getattr(model.config, "moe_layers", None):
        for batch in batch_list:
            loss, n = _loss_sum(model(**batch).logits, batch)
            total, count = total + loss, count + n
        return total / count, None
    choices = {}

    def on_forward(inputs, outputs, moe, executed, top1):
        nonlocal total, count
        loss, n = _loss_sum(outputs.logits, inputs)
        total, count = total + loss, count + n
        real = inputs["attention_mask"].reshape(-1).bool()
        for layer, first in top1.items():
            counts = torch.bincount(first[real], minlength=model.config.num_local_experts)
            choices[layer] = counts if layer not in choices else choices[layer] + counts

    run_recorded(model, batch_list, on_forward)
    shares = {str(layer): (c / c.sum()).tolist() for layer, c in sorted(choices.items())}
    return total / count, shares


# ---------------------------------------------------------------- the run


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.joint_steps, args.eval_texts, args.num_prompts = 3, 3, 8, 2
        args.warmup = 1
    output = args.output or (Path(tempfile.gettempdir()) / "merge_finetunes_quick.json" if args.quick or args.tiny
                             else DEFAULT_OUTPUT)
    command = " ".join(shlex.quote(c) for c in ["python", "benchmarks/quality/merge_finetunes.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    record = {"command": command, "settings": {k: str(v) if isinstance(v, Path) else v
                                               for k, v in vars(args).items()},
              "machine": machine_info()}
    start, cpu_start = time.time(), time.process_time()
    seconds = {}

    def phase(name, t0):
        seconds[name] = round(time.time() - t0, 1)
        print(f"[{time.time() - start:7.1f} s] {name}: {seconds[name]} s", flush=True)
        return time.time()

    rng = random.Random(args.seed)
    t = time.time()
    base, tokenizer = tiny_model_and_tokenizer(args.seed) if args.tiny else real_model_and_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    domains, about = (tiny_domains if args.tiny else real_domains)(args, rng)
    names = list(domains)
    record["model"] = "tiny random Llama (4 layers, hidden 32)" if args.tiny else "SmolLM2-135M-Instruct"
    record["domains"] = about
    # Each domain's training texts: prompts first, then the fine-tune's batches, then the joint run's.
    need = args.num_prompts + (args.steps + args.joint_steps) * args.batch
    for name in names:
        if len(domains[name][0]) < need:
            sys.exit(f"domain {name} has {len(domains[name][0])} training texts, {need} needed")
    prompts = {name: domains[name][0][:args.num_prompts] for name in names}
    tune_texts = {name: domains[name][0][args.num_prompts:args.num_prompts + args.steps * args.batch]
                  for name in names}
    joint_from = args.num_prompts + args.steps * args.batch
    half = args.batch // 2
    joint_batches = []
    for step in range(args.joint_steps):  # each batch: half of each domain, interleaved
        a = domains[names[0]][0][joint_from + step * half:joint_from + (step + 1) * half]
        rest = args.batch - half
        b = domains[names[1]][0][joint_from + step * rest:joint_from + (step + 1) * rest]
        mixed = [text for pair in zip(a, b) for text in pair] + a[len(b):] + b[len(a):]
        joint_batches.append(encode(tokenizer, mixed, args.max_length))
    held = {name: batches(tokenizer, domains[name][1], 16, args.max_length) for name in names}
    record["held_out_tokens"] = {name: sum(int(b["attention_mask"].sum()) for b in held[name]) for name in names}
    t = phase("load model and data", t)

    losses, train_loss, routing = {}, {}, {}

    def evaluate(label, model):
        results = {name: evaluate_model(model, held[name]) for name in names}
        losses[label] = {name: loss for name, (loss, _) in results.items()}
        if any(shares is not None for _, shares in results.values()):
            routing[label] = {name: shares for name, (_, shares) in results.items()}
        print(f"  {label}: " + ", ".join(f"{n} {v:.4f}" for n, v in losses[label].items()), flush=True)

    evaluate("base", base)
    t = phase("evaluate base", t)

    import copy

    tunes = {}
    for name in names:
        torch.manual_seed(args.seed)
        tune = copy.deepcopy(base)
        train_loss[f"fine-tune {name}"] = train(tune, args.steps, batches(tokenizer, tune_texts[name], args.batch,
                                                                          args.max_length), args)
        tunes[name] = tune
        evaluate(f"fine-tune {name}", tune)
        t = phase(f"fine-tune {name}", t)

    settings = dict(top_k=args.top_k, layers=args.layers, seed=args.seed)
    sources = [tunes[n] for n in names]
    expert_prompts = [prompts[n] for n in names] if args.router_init != "random" else None
    merged = upcycle(sources, base=base, router_init=args.router_init, expert_prompts=expert_prompts,
                     tokenizer=tokenizer, **settings)
    merged_avg = upcycle(sources, router_init=args.router_init, expert_prompts=expert_prompts, tokenizer=tokenizer,
                         **settings)
    control = upcycle(tunes[names[0]], num_experts=2, **settings)
    t = phase("merge and copy-upcycle", t)
    for label, model in (("merged, step 0", merged), ("merged (average as shared), step 0", merged_avg),
                         (f"copy-upcycle of fine-tune {names[0]}, step 0", control)):
        evaluate(label, model)
    t = phase("evaluate step 0", t)

    for label, model in (("merged", merged), (f"copy-upcycle of fine-tune {names[0]}", control)):
        torch.manual_seed(args.seed)
        train_loss[f"{label}, joint"] = train(model, args.joint_steps, joint_batches, args)
        evaluate(f"{label}, after joint fine-tune", model)
        t = phase(f"joint fine-tune: {label}", t)

    record.update({
        "domain_names": names,
        "expert_of_domain": {name: i for i, name in enumerate(names)},
        "prompts": prompts,
        "eval_loss": losses,
        "perplexity": {label: {n: math.exp(v) for n, v in per.items()} for label, per in losses.items()},
        "final_train_loss": train_loss,
        "routing_share": routing,
        "moe_layers": merged.config.moe_layers,
        "parameters": {"dense": sum(p.numel() for p in base.parameters()),
                       "moe": sum(p.numel() for p in merged.parameters())},
        "seconds": seconds,
        "wall_seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    })
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output} ({record['wall_seconds']} s wall, {record['cpu_seconds']} s CPU)")
    return record


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
