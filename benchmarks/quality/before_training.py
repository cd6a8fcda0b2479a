"""Before training: how much of the dense parent survives split upcycling (MoEfication, Zhang et al.
2022), k-means vs random neuron groups, with no fine-tuning at all.

    python benchmarks/quality/run.py before_training

all-MiniLM-L6-v2 (base model, no head) split into 8 experts per upcycled FFN, at top-k = 2, 4, 8,
on the config's `every_other` layers and on `all` layers. On 256 Banking77 test sentences:
- relative error ||h - h_dense|| / ||h_dense|| of the final hidden states (real tokens only);
- cosine similarity of mean-pooled sentence embeddings to the dense parent's;
- 1-nearest-neighbour (cosine) intent accuracy of the mean-pooled embeddings, 2,000 train
  sentences as the index: a task-quality proxy that needs no training.
top-k = 8 of 8 must reproduce the dense parent (a check of the split itself).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hf_condcomp import assets, upcycle  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "classification" / "banking77"
OUTPUT = Path(__file__).resolve().parent / "results" / "before_training.json"
SEED, NUM_TRAIN, NUM_TEST, MAX_LENGTH = 0, 2000, 256, 32


def embed(model, tokenizer, texts, batch_size=64):
    """(last hidden states per batch, attention masks per batch, mean-pooled (N, H))."""
    hidden, masks, pooled = [], [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt")
            # (B, T, H)
            h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            hidden.append(h)
            masks.append(m)
            pooled.append((h * m).sum(1) / m.sum(1))  # (B, H)
    return hidden, masks, torch.cat(pooled)


def knn_accuracy(train_emb, train_labels, test_emb, test_labels):
    sims = torch.nn.functional.normalize(test_emb, dim=-1) @ torch.nn.functional.normalize(train_emb, dim=-1).T
    pred = [train_labels[j] for j in sims.argmax(-1).tolist()]
    return sum(p == t for p, t in zip(pred, test_labels)) / len(test_labels)


def main():
    torch.manual_seed(SEED)
    train = pd.read_csv(DATA / "train.csv").sample(n=NUM_TRAIN, random_state=SEED)
    test = pd.read_csv(DATA / "test.csv").sample(n=NUM_TEST, random_state=SEED)
    tr_texts, tr_labels = train["text"].astype(str).tolist(), train["category"].astype(str).tolist()
    te_texts, te_labels = test["text"].astype(str).tolist(), test["category"].astype(str).tolist()
    path = assets.resolve("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    d_hidden, d_masks, d_pooled = embed(dense, tokenizer, te_texts)
    _, _, d_train = embed(dense, tokenizer, tr_texts)
    rows = [{"model": "dense parent", "init": None, "layers": None, "top_k": None, "relative_error": 0.0,
             "cosine": 1.0, "knn_accuracy": knn_accuracy(d_train, tr_labels, d_pooled, te_labels)}]
    start = time.time()
    for layers in ("every_other", "all"):
        for init in ("split-kmeans", "split-random", "copy"):
            for top_k in ((2,) if init == "copy" else (2, 4, 8)):
                model = upcycle("all-MiniLM-L6-v2", task="base", num_experts=8, top_k=top_k, init=init,
                                layers=layers, seed=SEED).eval()
                hidden, _, pooled = embed(model, tokenizer, te_texts)
                _, _, train_pooled = embed(model, tokenizer, tr_texts)
                err_num = sum((((h - dh) ** 2) * m).sum() for h, dh, m in zip(hidden, d_hidden, d_masks))
                err_den = sum(((dh ** 2) * m).sum() for dh, m in zip(d_hidden, d_masks))
                row = {"model": f"{init} {layers} top-{top_k}/8", "init": init, "layers": layers, "top_k": top_k,
                       "relative_error": (err_num / err_den).sqrt().item(),
                       "cosine": torch.nn.functional.cosine_similarity(pooled, d_pooled, dim=-1).mean().item(),
                       "knn_accuracy": knn_accuracy(train_pooled, tr_labels, pooled, te_labels)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({
        "commit": head, "command": "python benchmarks/quality/run.py before_training",
        "machine": f"{os.cpu_count()}-core CPU, shared", "wall_seconds": time.time() - start,
        "settings": {"seed": SEED, "num_train_index": NUM_TRAIN, "num_test": NUM_TEST, "max_length": MAX_LENGTH,
                     "num_experts": 8, "source": "all-MiniLM-L6-v2"},
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
