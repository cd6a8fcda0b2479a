"""Which tokens the routed blocks of a trained MoD classifier compute (RESULTS.md, "Compute trade-off").

    python benchmarks/quality/probe_routing.py /tmp/hf_condcomp_quality/classification/mod_c0.55_all_nopin_seed2

Loads a model the classification recipe saved (through its remote code, as a user would), runs
the first `--num` Banking77 test questions in eval mode, and prints per routed block: the router
weight norm, how often [CLS] and the final [SEP] were computed, and the keep rate of the most
common words. Nothing here trains or changes the model.
"""

import argparse
import csv
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_condcomp.modeling.architectures import find_layers

ROOT = Path(__file__).resolve().parents[2]
# The full Banking77 test set where the maintainers' data sits beside the clone (../shared/data).
TEST = ROOT.parent / "shared" / "data" / "classification" / "banking77" / "test.csv"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="output_dir of a classification run with MoD layers")
    parser.add_argument("--num", type=int, default=256, help="test questions to route")
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--words", type=int, default=12, help="most common words to report")
    parser.add_argument("--data", type=Path, default=TEST, help="a CSV with a `text` column (default: %(default)s)")
    args = parser.parse_args(argv)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, trust_remote_code=True).eval()
    routers = [getattr(layer, "mod_router", None) for layer in find_layers(model, model.config.num_hidden_layers)[1]]
    if not any(routers):
        raise SystemExit(f"{args.model} has no Mixture-of-Depths layers (config `mod_layers` is empty)")
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = list(csv.DictReader(args.data.open()))[: args.num]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=args.max_length,
              return_tensors="pt")
    for r in filter(None, routers):
        r.record_routing, r.routing_log = True, []
    with torch.no_grad():
        model(**enc)
    real = enc["attention_mask"].bool()
    n = real.sum(-1)
    print(f"{args.model}: keep_pooled_token={model.config.keep_pooled_token}, capacity "
          f"{model.config.mod_capacity}, {len(rows)} questions, {n.float().mean():.1f} real tokens on average")
    words = Counter()
    for b in range(len(rows)):
        words.update(tok.convert_ids_to_tokens(enc["input_ids"][b, 1 : int(n[b]) - 1].tolist()))
    common = [w for w, _ in words.most_common(args.words)]
    for i, router in enumerate(routers):
        if router is None:
            continue
        keep = router.routing_log[-1]  # (B, T)
        cls = keep[:, 0].float().mean().item()
        sep = keep[torch.arange(len(n)), n - 1].float().mean().item()
        rates = []
        for w in common:
            wid = tok.convert_tokens_to_ids(w)
            hit = (enc["input_ids"] == wid) & real
            hit[:, 0] = False
            rates.append(f"{w} {keep[hit].float().mean().item():.2f}")
        print(f"layer {i}: router |w| {router.weight.norm().item():.3f}, [CLS] computed {cls:.2f}, "
              f"[SEP] {sep:.2f}; words: {', '.join(rates)}")


if __name__ == "__main__":
    main()
