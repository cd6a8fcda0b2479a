"""Routers that start from prompts (`router_init`), as mergekit-moe's `gate_mode` does:

- `hidden`: each expert's prompts pass through the dense model that holds the shared weights;
  its router row in layer i is the mean hidden state at layer i's input (`hidden_states[i]`
  with output_hidden_states: the embeddings for layer 0), averaged over each prompt's tokens
  (padding excluded), then over the prompts; with negative prompts, the positive mean minus
  the negative mean; each row then has unit L2 norm.
- `hidden_last`: the same with each prompt's last token instead of its mean (mergekit's `hidden`).
- `cheap_embed`: the sum of the prompts' token embeddings, unit norm, the same row in every
  layer (with negative prompts: positive minus negative, each unit norm, the difference again).

`expert_prompts` gives the prompts of each source (or of each expert): a list with one entry
per source, per expert or per distinct source (in order of first mention), or a dict keyed by
the source as given; an entry is a list of positive prompts, a dict with `positive_prompts` and
`negative_prompts` (each a list or a file), or a path to a text file (one positive prompt a
line) or a YAML file (either form). The whole setting may be a path to a YAML file holding the
list or dict.
"""

from pathlib import Path

import torch
import yaml

PROMPT_KEYS = ("positive_prompts", "negative_prompts")


def read_prompt_file(path, what):
    """The prompts (or prompt sets) of a text file, one prompt a line, or of a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: prompt file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yml", ".yaml", ".json"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{what}: {str(path)!r} is not valid YAML ({str(err).splitlines()[0]}).") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prompt_set(entry, what) -> tuple[list[str], list[str]]:
    """(positive prompts, negative prompts) of one expert's entry."""
    if isinstance(entry, (str, Path)):
        entry = read_prompt_file(entry, what)
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(PROMPT_KEYS))
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {unknown}; an expert's prompts are {list(PROMPT_KEYS)}.")
        positive, negative = (entry.get(key) or [] for key in PROMPT_KEYS)
        positive, negative = (read_prompt_file(p, what) if isinstance(p, (str, Path)) else p
                              for p in (positive, negative))
    else:
        positive, negative = entry or [], []
    for prompts in (positive, negative):
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{what}: prompts must be a list of strings, got {prompts!r}.")
    if not positive:
        raise ValueError(f"{what}: no positive prompts; routers that start from prompts need at least one per expert.")
    return positive, negative


def expert_prompt_sets(expert_prompts, source_names, num_experts):
    """One (positive, negative) pair per expert, from `expert_prompts` (see module docstring)."""
    if isinstance(expert_prompts, (str, Path)):
        expert_prompts = read_prompt_file(expert_prompts, "`expert_prompts`")
    if expert_prompts is None:
        raise ValueError("`expert_prompts` is needed by router_init hidden, hidden_last and cheap_embed: give each "
                         "source (or expert) its prompts.")
    per_source = num_experts // len(source_names)
    if isinstance(expert_prompts, dict):
        missing = [name for name in dict.fromkeys(source_names) if name not in expert_prompts]
        unknown = [key for key in expert_prompts if key not in source_names]
        if missing or unknown:
            raise ValueError(f"`expert_prompts` is keyed by source: missing {missing}, unknown {unknown}.")
        entries = [expert_prompts[name] for name in source_names for _ in range(per_source)]
    elif isinstance(expert_prompts, (list, tuple)):
        if len(expert_prompts) == len(source_names):
            entries = [entry for entry in expert_prompts for _ in range(per_source)]
        elif len(expert_prompts) == num_experts:
            entries = list(expert_prompts)
        elif len(expert_prompts) == len(distinct := list(dict.fromkeys(source_names))):  # a source named twice
            entries = [expert_prompts[distinct.index(name)] for name in source_names for _ in range(per_source)]
        else:
            raise ValueError(f"`expert_prompts` has {len(expert_prompts)} entries: give one per source "
                             f"({len(source_names)}) or one per expert ({num_experts}).")
    else:
        raise ValueError(f"`expert_prompts` must be a list, a dict by source or a file path, got "
                         f"{type(expert_prompts).__name__}.")
    return [_prompt_set(entry, f"`expert_prompts` of expert {i}") for i, entry in enumerate(entries)]


def _tokenize(tokenizer, prompts):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer(prompts, padding=True, return_tensors="pt")


def _prompt_means(model, batch, layers, last):
    """(len(layers), H): per layer, the mean over prompts of each prompt's mean (or last) hidden state."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    rows = []
    for i in layers:
        h = out.hidden_states[i].float()  # (B, T, H): the input of layer i
        if last:  # the last real token of each prompt, whichever side the padding is on
            position = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
            per_prompt = h[torch.arange(h.shape[0]), position]
        else:
            per_prompt = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        rows.append(per_prompt.mean(0))
    return torch.stack(rows)


def _cheap_embedding(model, batch):
    mask = batch["attention_mask"].unsqueeze(-1)
    with torch.no_grad():
        summed = (model.get_input_embeddings()(batch["input_ids"]).float() * mask).sum((0, 1))
    return summed / summed.norm().clamp(min=1e-8)


def prompt_router_rows(model, tokenizer, prompt_sets, layers, mode) -> dict[int, torch.Tensor]:
    """{layer: router weight (E, H)} from each expert's prompts (see module docstring)."""
    was_training = model.training
    model.eval()
    per_expert = []
    cache = {}
    for positive, negative in prompt_sets:
        key = (tuple(positive), tuple(negative))
        if key not in cache:
            if mode == "cheap_embed":
                row = _cheap_embedding(model, _tokenize(tokenizer, positive))
                if negative:
                    row = row - _cheap_embedding(model, _tokenize(tokenizer, negative))
                rows = row.expand(len(layers), -1)
            else:
                last = mode == "hidden_last"
                rows = _prompt_means(model, _tokenize(tokenizer, positive), layers, last)
                if negative:
                    rows = rows - _prompt_means(model, _tokenize(tokenizer, negative), layers, last)
            cache[key] = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        per_expert.append(cache[key])
    model.train(was_training)
    stacked = torch.stack(per_expert, dim=1)  # (layers, E, H)
    return {layer: stacked[j] for j, layer in enumerate(layers)}
