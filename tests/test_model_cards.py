"""Every folder this package writes has a true model card: `upcycle` (command line and
`save_pretrained` from Python), `merge`, `export`, `push_to_hub` and the recipes. The metadata is
what the Hub reads (`huggingface_hub.ModelCard` parses it), `base_model` is a Hub id or absent
(a local source is named by its path), and a recipe's card lists the local files it read with
their sha256, not the Hub dataset its config names."""

import hashlib

import pytest
from huggingface_hub import ModelCard

import hf_condcomp
from hf_condcomp.cards import TAG, describe_source
from hf_condcomp.cli import main as cli_main

from conftest import DATA, ROOT, run_recipe, sample_bpe_tokenizer, tiny_source


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card(folder) -> ModelCard:
    readme = folder / "README.md"
    assert readme.is_file(), f"{folder} has no README.md"
    parsed = ModelCard.load(readme)
    assert TAG in parsed.data.tags and parsed.data.library_name == "transformers"
    return parsed


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards") / "tiny-llama"
    tokenizer = sample_bpe_tokenizer()
    tiny_source("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sources_are_named_as_what_they_are(tiny_llama):
    assert describe_source("all-MiniLM-L6-v2")[1] == "sentence-transformers/all-MiniLM-L6-v2"
    assert describe_source("SmolLM2-135M-Instruct")[1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert describe_source("org/model") == ("[`org/model`](https://huggingface.co/org/model)", "org/model")
    assert describe_source(str(tiny_llama)) == (f"the local folder `{tiny_llama}`", None)
    assert describe_source("./no/such/folder")[1] is None and describe_source("/no/such")[1] is None
    in_memory = tiny_source("llama")
    assert describe_source(in_memory) == ("a `LlamaForCausalLM` passed in memory", None)


def test_save_pretrained_after_upcycle_writes_a_card(tiny_llama, tmp_path):
    model = hf_condcomp.upcycle(str(tiny_llama), num_experts=4, layers="all")
    model.save_pretrained(tmp_path / "moe")
    parsed = card(tmp_path / "moe")
    assert parsed.data.base_model is None  # a local folder is no Hub id
    assert f"upcycled from the local folder `{tiny_llama}`" in parsed.text
    assert "| num_experts | 4 |" in parsed.text and "MoE layers: [0, 1, 2, 3]." in parsed.text
    assert 'AutoModelForCausalLM.from_pretrained("moe", trust_remote_code=True)' in parsed.text
    assert parsed.data.pipeline_tag == "text-generation" and "mixture-of-experts" in parsed.data.tags


def test_push_to_hub_uploads_the_card_instead_of_transformers_blank_one(tiny_llama, monkeypatch):
    import transformers.utils.hub as hub
    from huggingface_hub.errors import EntryNotFoundError

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def no_card(repo_id, token=None):
        raise EntryNotFoundError("no README.md")

    uploaded = {}

    def upload(self, working_dir, repo_id, *args, **kwargs):
        uploaded.update(repo_id=repo_id, card=ModelCard.load(f"{working_dir}/README.md"))

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo, token=None, **kw: (
        no_card(repo) if str(repo) == "someone/tiny-moe" else cls(open(repo, encoding="utf-8").read()))))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    hf_condcomp.upcycle(str(tiny_llama), num_experts=4).push_to_hub("someone/tiny-moe")
    pushed = uploaded["card"]
    assert uploaded["repo_id"] == "someone/tiny-moe" and TAG in pushed.data.tags
    assert 'from_pretrained("someone/tiny-moe", trust_remote_code=True)' in pushed.text


def test_upcycle_merge_and_export_commands_write_cards(tiny_llama, tmp_path, capsys):
    assert cli_main(["upcycle", str(tiny_llama), str(tmp_path / "moe"), "--num-experts", "4", "--layers", "all"]) == 0
    upcycled = card(tmp_path / "moe")
    assert upcycled.text.strip().splitlines()[0] == "# moe"  # the folder's name, not the temporary one it was saved to
    assert upcycled.data.base_model is None

    config = tmp_path / "moe.yml"
    config.write_text(f"gate_mode: random\nexperts:\n  - source_model: {tiny_llama}\n  - source_model: {tiny_llama}\n")
    assert cli_main(["merge", str(config), str(tmp_path / "merged")]) == 0
    merged = card(tmp_path / "merged")
    assert f"| `{config}` | mergekit-moe config | {config.stat().st_size} | `{sha256(config)}` |" in merged.text
    assert "the sources' average" in merged.text and merged.data.base_model is None

    assert cli_main(["export", str(tmp_path / "moe"), str(tmp_path / "native")]) == 0
    exported = card(tmp_path / "native")
    assert "A native `MixtralForCausalLM`" in exported.text and "trust_remote_code" not in exported.text
    assert 'AutoModelForCausalLM.from_pretrained("native")' in exported.text
    assert exported.data.base_model is None and exported.data.datasets is None
    capsys.readouterr()


def test_recipe_card_lists_the_files_it_read_not_the_configs_hub_dataset(tmp_path, recipe_env):
    """The SST-2 config names `stanfordnlp/sst2`; local files given instead are what the card names
    (a tiny BERT in place of the config's MiniLM keeps the run short)."""
    from transformers import AutoTokenizer

    sample_bpe_tokenizer().save_pretrained(tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path / "bert")
    tiny_source("bert", "sequence-classification", vocab_size=len(tokenizer), num_labels=2).save_pretrained(
        tmp_path / "bert")
    train, test = DATA / "sst2" / "train.tsv", DATA / "sst2" / "test.tsv"
    run_recipe("classification", "--config", ROOT / "recipes/configs/classification_sst2.yaml",
               "--model_name_or_path", tmp_path / "bert",
               "--train_file", train, "--validation_file", test, "--output_dir", tmp_path / "out",
               "max_train_steps=1", "max_train_samples=16", "max_eval_samples=16", "with_tracking=false",
               "checkpointing_steps=null", "routing_eval_batches=1", "upcycling.num_experts=2")
    parsed = card(tmp_path / "out")
    assert parsed.data.datasets is None and "stanfordnlp" not in parsed.content
    assert parsed.data.base_model is None and f"upcycled from the local folder `{tmp_path / 'bert'}`" in parsed.text
    for file in (train, test):
        assert f"| `{file}` | " in parsed.text and f"| `{sha256(file)}` |" in parsed.text
    evals = parsed.data.eval_results
    assert evals and {r.dataset_name for r in evals} == {str(test)} and {r.dataset_type for r in evals} == {"csv"}
    assert "https://github.com/)" not in parsed.text and "](all-MiniLM-L6-v2)" not in parsed.text
