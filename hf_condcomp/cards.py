"""Model cards: the README.md of every folder this package writes.

- `upcycle` gives its model an `UpcycleCard`, which the model's `save_pretrained` (and
  `push_to_hub`, in place of transformers' blank card) calls: `hf-condcomp upcycle`, `merge` and
  `model.save_pretrained(folder)` from Python all write it. It is built when the model is
  upcycled, while the sources are at hand: a Hub id is named as one (and is the card's
  `base_model`), a local folder as a local path, an embedded name as the Hub model it is a copy of.
- `export` writes `write_export_card` into the native folder.
- The recipes write theirs with `hf_condcomp.training.write_model_card`, from the same pieces
  (`describe_source`, `file_rows`).

Metadata is what the Hub reads (`huggingface_hub.ModelCardData`): `base_model` only for Hub ids,
`library_name`, `tags`, `pipeline_tag`, and `datasets` only for Hub datasets a model was trained on.
"""

import hashlib
import os
from pathlib import Path

from . import assets

# Every card this package writes carries this tag; a README.md without it is someone else's and stays.
TAG = "hf_condcomp"
VARIANT_TAGS = {"moe": "mixture-of-experts", "mod": "mixture-of-depths", "gate": "conditional-computation"}
PIPELINE_TAGS = {
    "causal-lm": "text-generation", "sequence-classification": "text-classification",
    "token-classification": "token-classification", "masked-lm": "fill-mask", "seq2seq-lm": "text2text-generation",
    "base": "feature-extraction",
}
# The first line of the card transformers' `push_to_hub` makes for a repository that has none.
_BLANK_CARD = "This model card has been automatically generated."


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path, what) -> dict:
    """What a card says of a local file that was read: its path as given, its role, size and sha256."""
    return {"path": str(path), "what": what, "bytes": os.path.getsize(path), "sha256": sha256(path)}


def file_rows(records) -> str:
    """A markdown table of `file_record`s."""
    rows = ["| file | what | bytes | sha256 |", "|---|---|---|---|"]
    rows += [f"| `{r['path']}` | {r['what']} | {r['bytes']} | `{r['sha256']}` |" for r in records]
    return "\n".join(rows)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def describe_source(source) -> tuple[str, str | None]:
    """(markdown that says what `source` is, its Hub id or None): a Hub id, a local folder (written as
    its path), an embedded name (the Hub model it is a copy of), or a model passed in memory."""
    from transformers import PreTrainedModel

    if isinstance(source, PreTrainedModel):
        origin = getattr(source, "name_or_path", "") or ""
        if not origin:
            return f"a `{type(source).__name__}` passed in memory", None
        what, hub = describe_source(origin)
        return f"a `{type(source).__name__}` passed in memory, loaded from {what}", hub
    name = str(source)
    if name in assets.EMBEDDED_HUB_IDS:
        hub = assets.EMBEDDED_HUB_IDS[name]
        copy = assets.EMBEDDED_COPIES[name]
        return f"`{name}`, the embedded copy of [`{hub}`](https://huggingface.co/{hub}) ({copy})", hub
    if _is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name})", name
    return f"the local folder `{name}`", None


def card_data(base_models, variant, task, datasets=None, **extra):
    """`ModelCardData` with `base_model` only for Hub ids and `datasets` only when given."""
    from huggingface_hub import ModelCardData

    hubs = list(dict.fromkeys(b for b in base_models if b))
    return ModelCardData(
        base_model=(hubs[0] if len(hubs) == 1 else hubs) or None, library_name="transformers",
        tags=[TAG, "upcycling", VARIANT_TAGS.get(variant, variant or "moe")], pipeline_tag=PIPELINE_TAGS.get(task),
        datasets=list(datasets) if datasets else None, **extra,
    )


def our_card_data(readme):
    """The metadata of the card `readme` when this package wrote it, else None (no file, no card, another's)."""
    from huggingface_hub import ModelCard

    if not Path(readme).is_file():
        return None
    try:
        data = ModelCard.load(readme).data
    except Exception:  # noqa: BLE001 - a README.md that is no card tells nothing
        return None
    return data if TAG in (data.tags or []) else None


def base_models_of(data) -> list:
    """A card's `base_model` metadata as a list."""
    base = data.base_model or []
    return [base] if isinstance(base, str) else list(base)


def _ours_or_blank(readme: Path) -> bool:
    """Whether README.md is absent, one of ours, or transformers' blank card: only then is it (re)written."""
    if not readme.is_file():
        return True
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(readme)
    except Exception:  # noqa: BLE001 - a README.md that is no card is the user's
        return False
    return TAG in (card.data.tags or []) or _BLANK_CARD in card.text


def _settings_table(record: dict, skip=("source", "expert_sources", "source_model_type", "task")) -> str:
    rows = ["| setting | value |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in record.items() if v is not None and k not in skip]
    return "\n".join(rows)


def _loading(auto_class: str, model_id: str, remote_code: bool = True) -> str:
    trust = ", trust_remote_code=True" if remote_code else ""
    return (f"```python\nfrom transformers import {auto_class}, AutoTokenizer\n\n"
            f'model = {auto_class}.from_pretrained("{model_id}"{trust})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n```')


def _versions() -> str:
    from .modeling.compat import MINIMUM_TORCH, TESTED_TORCH, TESTED_TRANSFORMERS

    return (f"The modeling code that comes with the weights was tested with transformers "
            f"{' to '.join(TESTED_TRANSFORMERS)} and torch {' and '.join(TESTED_TORCH)} (it needs torch >= "
            f"{MINIMUM_TORCH}); it runs on whichever of them you have installed, without `hf_condcomp`.")


def _what(record: dict, sources: list, base) -> str:
    variant = record.get("variant") or "moe"
    if variant == "moe":
        kind = (f"a Mixture-of-Experts model ({record.get('num_experts')} experts, top-{record.get('top_k')}, "
                f"{record.get('routing')}, init `{record.get('init')}`)")
    else:
        kind = {"mod": "a Mixture-of-Depths model", "gate": "a model with compute-allocation gates"}.get(
            variant, f"a `{variant}` model")
    if record.get("expert_sources"):
        shared = f"the base model {base}" if base else "the sources' average"
        return (f"This is {kind} whose experts were made from the dense fine-tunes {', '.join(sources)} (each "
                f"source's FFNs became its experts in each MoE layer), with the shared weights of {shared} and "
                f"routers initialised by `{record.get('router_init')}`, made with the `hf_condcomp` package.")
    return f"This is {kind} upcycled from {sources[0]} with the `hf_condcomp` package."


def _layers(config) -> str:
    parts = []
    for field, what in (("moe_layers", "MoE layers"), ("decoder_moe_layers", "decoder MoE layers"),
                        ("mod_layers", "Mixture-of-Depths layers"), ("gate_layers", "gated layers")):
        value = getattr(config, field, None)
        if value:
            parts.append(f"{what}: {list(value)}")
    return "; ".join(parts) + "." if parts else ""


class UpcycleCard:
    """The card of a model `upcycle` made, held by the model and written by its `save_pretrained`.
    `files` holds the `file_record`s of the local files upcycling read beside the checkpoints (a
    prompt file, a mergekit-moe config: `add_file`)."""

    def __init__(self, sources, base=None, files=()):
        self.sources = [describe_source(s) for s in sources]
        self.base = describe_source(base) if base is not None else None
        self.files = []
        self.name = None  # the folder's name when it is written elsewhere first (an atomic save)
        for path, what in files:
            self.add_file(path, what)

    def add_file(self, path, what):
        self.files.append(file_record(path, what))

    def __call__(self, model, folder, repo_id=None):
        folder = Path(folder)
        if not _ours_or_blank(folder / "README.md"):
            return None
        from huggingface_hub import ModelCard

        config = model.config
        record = dict(getattr(config, "upcycling", None) or {})
        hubs = [hub for _, hub in ([self.base] if self.base else []) + self.sources]
        data = card_data(hubs, record.get("variant"), record.get("task"))
        model_id = repo_id or self.name or folder.name
        auto = type(model)._auto_class_of_task.__name__
        files = (f"\n\n## Files read\n\nBeside the source checkpoints, upcycling read:\n\n{file_rows(self.files)}"
                 if self.files else "")
        text = "\n\n".join([
            f"---\n{data.to_yaml()}\n---",
            f"# {model_id}",
            _what(record, [s for s, _ in self.sources], self.base[0] if self.base else None),
            "## Upcycling\n\n" + _settings_table(record) + "\n\n" + _layers(config) + files,
            "## Training and evaluation\n\nUpcycling reads no training data, and this card records no "
            "training or evaluation: it is written from the upcycling record in `config.json` (`upcycling`). "
            "Describe here any training done after upcycling.",
            "## How to load\n\n" + _loading(auto, model_id) + "\n\n" + _versions(),
        ]) + "\n"
        card = ModelCard(text)
        card.save(folder / "README.md")
        return card


_NATIVE_AUTO = {"CausalLM": "AutoModelForCausalLM", "ConditionalGeneration": "AutoModelForSeq2SeqLM"}


def write_export_card(folder, model_dir, config, architecture: str, max_abs_diff=None, name=None):
    """README.md of a native export in `folder`: the native class (`architecture`), the folder it was exported from,
    the upcycling record, the export check, and what the exported folder's own card says of its
    sources and data (`base_model`, `datasets`), which the export keeps. `name`: the folder's name, when
    `folder` is where it is written first."""
    from huggingface_hub import ModelCard

    record = dict(getattr(config, "upcycling", None) or {})
    base_models, datasets, source_card = [], None, Path(model_dir) / "README.md"
    if source_card.is_file():
        data = our_card_data(source_card)
        if data is not None:
            base_models, datasets = base_models_of(data), data.datasets
    else:  # a folder saved without a card (by an earlier release): its sources as recorded
        names = ([record["source"]] if record.get("source") else []) + list(record.get("expert_sources") or [])
        base_models = [hub for _, hub in map(describe_source, names)]
    data = card_data(base_models, record.get("variant"), record.get("task"), datasets)
    check = (f"Before it was written, its logits were compared with the upcycled model's on a fixed batch: "
             f"max |difference| {max_abs_diff:.3g}." if max_abs_diff is not None else "")
    text = "\n\n".join([
        f"---\n{data.to_yaml()}\n---",
        f"# {name or Path(folder).name}",
        f"A native `{architecture}` exported by `hf-condcomp export` from the upcycled model in the local folder "
        f"`{model_dir}`. It loads with plain `transformers`, no remote code, and serving engines that support "
        f"`{architecture}` serve it. {check}",
        "## Upcycling\n\n" + _settings_table(record),
        "## Training and evaluation\n\n" + (
            f"As the card of `{model_dir}` records (its `base_model` and `datasets` are kept here)."
            if source_card.is_file() else f"`{model_dir}` has no card: none is recorded."),
        "## How to load\n\n" + _loading(_NATIVE_AUTO.get(architecture.rpartition("For")[2], "AutoModel"),
                                        name or Path(folder).name, remote_code=False),
    ]) + "\n"
    card = ModelCard(text)
    card.save(Path(folder) / "README.md")
    return card
