"""The conventions that clients rely on, rather than on this package's code: the saved layout of
transformers' MoE models (the dense model's weight names, `base_model`, the head, `mlp.gate` and
`mlp.experts`), their config fields, router logits on the base model's output, the auxiliary loss
by `output_router_logits`, a config that pickles by value (vLLM's engine process), and a PEFT adapter
that moves between the shared folder and its native export."""

import json
import pickle

import pytest
import torch
from transformers import AutoConfig, MarianConfig, MarianMTModel

import hf_condcomp

from conftest import DATA, VOCAB, run_clean_python, sample_bpe_tokenizer, tiny_source


def tiny_marian():
    torch.manual_seed(0)
    return MarianMTModel(MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40,
                                      decoder_ffn_dim=40, max_position_embeddings=32, pad_token_id=0,
                                      decoder_start_token_id=0)).eval()


SOURCES = {  # name: (dense model, task)
    "llama": (lambda: tiny_source("llama"), "causal-lm"),
    "gpt2": (lambda: tiny_source("gpt2"), "causal-lm"),
    "bert_classifier": (lambda: tiny_source("bert", "sequence-classification"), "sequence-classification"),
    "bert_base": (lambda: tiny_source("bert"), "base"),
    "marian": (tiny_marian, "seq2seq-lm"),
}


def moe_blocks(model):
    """The dotted names of `model`'s MoE blocks (in the places of the dense FFN modules)."""
    blocks = [name for name, module in model.named_modules() if type(module).__name__ == "NativeMoEFeedForward"]
    assert blocks
    return blocks


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_saved_layout_is_the_dense_models_with_transformers_moe_names(name):
    build, task = SOURCES[name]
    dense = build()
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all", task=task, num_labels=3)
    # the base model and the head where the source's task class keeps them
    assert model.base_model_prefix == dense.base_model_prefix
    assert (model.base_model is model) == (task == "base")
    if task != "base":
        assert type(model.base_model) is type(dense.base_model)
    head = dense.get_output_embeddings()
    if head is not None:
        ours = dict(model.named_modules())
        dense_names = {id(m): n for n, m in dense.named_modules()}
        assert ours[dense_names[id(head)]] is model.get_output_embeddings()
    # every weight the upcycle does not change keeps its dense name; each MoE block is `gate` + `experts`
    ours, theirs = model.state_dict(), dense.state_dict()
    blocks = moe_blocks(model)
    in_blocks = {key for key in ours if any(key.startswith(block + ".") for block in blocks)}
    for block in blocks:
        assert f"{block}.gate.weight" in ours
        assert {key.rpartition(".")[2] for key in in_blocks if key.startswith(block + ".experts.")} >= {"down_proj"}
    dense_ffn = {key for key in theirs if any(key.startswith(block + ".") for block in blocks)}
    identity = {key for key in theirs if key not in ours}  # FFN parts that became the identity (BERT's output.dense)
    assert set(ours) - in_blocks == set(theirs) - dense_ffn - identity
    for key in set(ours) - in_blocks:
        assert torch.equal(ours[key], theirs[key]), key


def test_a_gated_ffn_block_has_mixtrals_names_and_shapes():
    model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="all")
    state = model.state_dict()
    assert state["model.layers.0.mlp.gate.weight"].shape == (4, 32)  # (E, H)
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 80, 32)  # (E, 2I, H)
    assert state["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 40)  # (E, H, I)
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_moe")
    hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="all").save_pretrained(folder)
    return folder


def test_the_config_has_transformers_moe_fields_and_the_sources_at_top_level(llama_folder):
    config = AutoConfig.from_pretrained(llama_folder, trust_remote_code=True)
    assert config.num_experts == config.num_local_experts == 4  # Qwen-MoE's name and Mixtral's
    assert config.num_experts_per_tok == 2 and config.moe_intermediate_size == 40
    assert config.output_router_logits is True  # `upcycle` trains with the router losses
    assert config.router_aux_loss_coef == 0.01 and config.router_z_loss_coef == 0.001
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (32, 4, 2)
    assert config.get_text_config() is config


def test_the_config_pickles_and_travels_by_value_to_a_process_without_the_package(llama_folder, tmp_path):
    """vLLM's engine runs in a second process and receives the config pickled with cloudpickle, the
    remote-code modules by value: nothing those classes reach may be an object that cannot be pickled.
    One clean process loads the folder's remote code and pickles its config so; another, which never
    loaded that code, unpickles it."""
    config = AutoConfig.from_pretrained(llama_folder, trust_remote_code=True)
    assert pickle.loads(pickle.dumps(config)).to_dict() == config.to_dict()
    pickled = tmp_path / "config.pkl"
    run_clean_python(f"""
import cloudpickle, pickle
from transformers import AutoConfig
config = AutoConfig.from_pretrained({str(llama_folder)!r}, trust_remote_code=True)
assert type(config).__module__.startswith("transformers_modules."), type(config).__module__
import transformers_modules
assert pickle.loads(pickle.dumps(config)).to_dict() == config.to_dict()
cloudpickle.register_pickle_by_value(transformers_modules)
open({str(pickled)!r}, "wb").write(cloudpickle.dumps(config))
""", tmp_path)
    run_clean_python(f"""
import pickle, sys
config = pickle.loads(open({str(pickled)!r}, "rb").read())
assert "transformers_modules" not in sys.modules or not hasattr(sys.modules["transformers_modules"], "__path__")
assert (config.num_experts, config.num_experts_per_tok, config.hidden_size) == (4, 2, 32), config
assert type(config).__name__ == "CondCompConfig"
""", tmp_path)


def test_router_logits_on_the_base_models_output_and_the_aux_loss_by_the_flag():
    """As Mixtral: `model.base_model(..., output_router_logits=True)` (what TRL's fused-loss trainers
    call) returns one (B*T, E) tensor per MoE layer, and the task head adds the weighted router losses
    where `output_router_logits` is set, and not where it is not."""
    model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="every_other").train()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    base = model.base_model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert base.last_hidden_state.shape == (2, 6, 32)
    assert isinstance(base.router_logits, tuple) and len(base.router_logits) == 2
    assert all(logits.shape == (12, 4) for logits in base.router_logits)
    assert "router_logits" not in model.base_model(input_ids=ids, attention_mask=mask, output_router_logits=False)
    torch.manual_seed(0)
    with_losses = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.manual_seed(0)
    without = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=False)
    assert without.aux_loss is None and without.router_logits is None
    expected = (model.config.router_aux_loss_coef * with_losses.aux_loss
                + model.config.router_z_loss_coef * with_losses.z_loss)
    torch.testing.assert_close(with_losses.loss - without.loss, expected)
    model.config.output_router_logits = False  # the config's flag is the default
    torch.manual_seed(0)
    assert model(input_ids=ids, attention_mask=mask, labels=ids).aux_loss is None


def test_a_lora_adapter_moves_between_the_shared_folder_and_its_native_export(tmp_path):
    """LoRA on attention and on the experts' 3-D weights (`target_parameters`), trained on the folder
    that carries our code, loads onto its Mixtral export with the same outputs; and the reverse."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_condcomp.export import export_native

    moe = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, init="noise", noise_std=0.3, layers="all")
    moe.save_pretrained(tmp_path / "ours")
    assert export_native(tmp_path / "ours", tmp_path / "native")["architecture"] == "MixtralForCausalLM"
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])

    def load(kind):
        if kind == "ours":
            return AutoModelForCausalLM.from_pretrained(tmp_path / "ours", trust_remote_code=True).eval()
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
        assert type(model).__name__ == "MixtralForCausalLM"
        return model

    for trained_on, loaded_on in (("ours", "native"), ("native", "ours")):
        peft_model = get_peft_model(load(trained_on), LoraConfig(**lora))
        with torch.no_grad():  # a trained adapter: every LoRA B away from its zero init
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
            expected = peft_model(ids).logits
            base = peft_model.get_base_model()
        adapter = tmp_path / f"adapter_{trained_on}"
        peft_model.save_pretrained(adapter)
        assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
        moved = PeftModel.from_pretrained(load(loaded_on), adapter).eval()
        with torch.no_grad():
            got = moved(ids).logits
            plain = moved.get_base_model()
            with moved.disable_adapter():
                untouched = moved(ids).logits
        assert (expected - untouched).abs().max() > 1e-2, "the adapter changes the outputs"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert base is not plain


@pytest.mark.parametrize("coef", [None, 0.0])
def test_trls_sft_trainer_with_its_defaults_fine_tunes_a_saved_moe(tmp_path, coef):
    """TRL's SFTTrainer, default SFTConfig (its fused LM-head loss calls `model.base_model` and adds the
    router auxiliary loss from the base model's `router_logits`), trains the folder loaded through its
    remote code: the experts, the routers and attention move, and the auxiliary loss is logged where
    the router coefficient is on (`router_aux_loss_coef` of the config, TRL's default), not where it is 0."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer


    tokenizer = sample_bpe_tokenizer()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all").save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    texts = [line.split(",")[0] for line in (DATA / "banking77" / "train.csv").read_text().splitlines()[1:17]]
    extra = {} if coef is None else {"router_aux_loss_coef": coef}
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     report_to="none", save_strategy="no", use_cpu=True, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    if coef is None:
        assert all(entry["aux_loss"] > 0 for entry in logged)  # Switch loss of 4 experts, top-2: about 2
    else:
        assert all("aux_loss" not in entry for entry in logged)
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    for part in (".mlp.gate.weight", ".mlp.experts.gate_up_proj", ".self_attn.q_proj.weight"):
        assert any(name.endswith(part) for name in moved), part


def test_a_renamed_head_is_saved_as_the_sources_class_saves_it(tmp_path):
    """transformers renames some classes' weights on loading and back on saving (GPT-NeoX's `lm_head`
    is `embed_out` in its checkpoints, and in releases before the rename): the folder holds the
    canonical name, which every release in the range loads, and reloads to the same logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    dense = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=40)).eval()
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all")
    dense.save_pretrained(tmp_path / "dense")
    model.save_pretrained(tmp_path / "moe")
    keys = {name: set(safe_open(tmp_path / name / "model.safetensors", "pt").keys()) for name in ("dense", "moe")}
    heads = {name: {k for k in found if not k.startswith("gpt_neox.")} for name, found in keys.items()}
    assert heads["moe"] == heads["dense"]
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
